"""The control-plane `Coordinator` service: engine-group leaders Register
once their Worker service listens, then Heartbeat with their status.

A thin adapter onto the Registry; it must not route, launch or stream.
"""

from __future__ import annotations

import grpc

from shardline.coordinator.registry import Registry
from shardline.proto import worker_pb2, worker_pb2_grpc


class CoordinatorServicer(worker_pb2_grpc.CoordinatorServicer):
    def __init__(self, registry: Registry, heartbeat_interval_s: float, expected_groups: frozenset[str] | None = None):
        self._registry = registry
        self._heartbeat_interval_s = heartbeat_interval_s
        self._expected_groups = expected_groups  # None: any group may join

    async def Register(self, request: worker_pb2.RegisterRequest, context: grpc.aio.ServicerContext):
        if not request.group:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "group: must not be empty")
        if self._expected_groups is not None and request.group not in self._expected_groups:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"group: {request.group!r} is not in the cluster config "
                                f"(expected one of {sorted(self._expected_groups)})")
        if not request.address or ":" not in request.address:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"address: expected host:port, got {request.address!r}")
        self._registry.register(request.group, request.address, request.role, request.model,
                                request.tp, request.pp)
        return worker_pb2.RegisterResponse(heartbeat_interval_s=self._heartbeat_interval_s)

    async def Heartbeat(self, request: worker_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext):
        return worker_pb2.HeartbeatResponse(known=self._registry.heartbeat(request.group, request.status))
