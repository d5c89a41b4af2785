"""The client API, `shardline.v1.Shardline`: Generate (admission, then the
Relay streams it), Abort, ListModels, GetStats.

Its handlers are registered by hand (`rpc_handler`) so Generate's request
deserializer can turn bytes protobuf refuses (invalid UTF-8) into an
INVALID_ARGUMENT that names the field instead of a bare INTERNAL error.

Must not talk to workers itself (the Relay does) or hold routing policy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import grpc

from shardline.coordinator.cluster_config import ClusterConfig
from shardline.coordinator.disagg import Disaggregator
from shardline.coordinator.metrics import Metrics
from shardline.coordinator.registry import GroupState, Registry
from shardline.coordinator.relay import ActiveRequest, Relay, RequestFailed
from shardline.coordinator.router import Router
from shardline.coordinator.validation import (InvalidRequest, PreparedRequest, RequestPreparer,
                                              parse_generate_request)
from shardline.proto import shardline_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Shardline"].full_name
_FINISH_REASON_NAMES = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
                        pb.FINISH_REASON_ABORT: "abort"}


class ShardlineServicer:
    def __init__(self, config: ClusterConfig, registry: Registry, router: Router, metrics: Metrics,
                 preparer: RequestPreparer, clock: Callable[[], float] = time.monotonic):
        self._config = config
        self._limits = config.coordinator.limits
        self._registry = registry
        self._router = router
        self._metrics = metrics
        self._preparer = preparer
        self._clock = clock
        self.disagg = Disaggregator(config.coordinator.disaggregation, registry, router, metrics)
        self._relay = Relay(registry, router, metrics, stall_check_s=config.coordinator.heartbeat_interval_s,
                            disagg=self.disagg, clock=clock)
        self._active: dict[str, ActiveRequest] = {}
        self.requests_total = 0

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        handlers = {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.generate, request_deserializer=parse_generate_request,
                response_serializer=pb.GenerateResponse.SerializeToString),
            "Abort": grpc.unary_unary_rpc_method_handler(
                self.abort, request_deserializer=pb.AbortRequest.FromString,
                response_serializer=pb.AbortResponse.SerializeToString),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                self.list_models, request_deserializer=pb.ListModelsRequest.FromString,
                response_serializer=pb.ListModelsResponse.SerializeToString),
            "GetStats": grpc.unary_unary_rpc_method_handler(
                self.get_stats, request_deserializer=pb.GetStatsRequest.FromString,
                response_serializer=pb.GetStatsResponse.SerializeToString),
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)

    @property
    def queue_depth(self) -> int:
        return len(self._active)

    # -- Generate ---------------------------------------------------------------

    async def generate(self, request: pb.GenerateRequest | InvalidRequest, context: grpc.aio.ServicerContext) -> None:
        self.requests_total += 1
        admitted_s = self._clock()
        code = grpc.StatusCode.OK
        try:
            active = self._admit(await self._prepare(request), admitted_s)
            try:
                reason = await self._relay.run(active, context.write, context.time_remaining)
            finally:
                self._release(active)
            self._metrics.requests_by_finish_reason.labels(_FINISH_REASON_NAMES.get(reason, "unknown")).inc()
            self._metrics.e2e_latency_s.observe(self._clock() - admitted_s)
        except RequestFailed as failed:
            code = failed.code
            await context.abort(failed.code, failed.message)
        except asyncio.CancelledError:
            remaining_s = context.time_remaining()
            expired = remaining_s is not None and remaining_s <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as err:  # a bug: say so instead of grpc's bare UNKNOWN
            log.exception("Generate failed")
            code = grpc.StatusCode.INTERNAL
            await context.abort(code, f"internal error: {type(err).__name__}: {err}")
        finally:
            self._metrics.requests_by_status.labels(code.name).inc()

    async def _prepare(self, request: pb.GenerateRequest | InvalidRequest) -> PreparedRequest:
        if isinstance(request, InvalidRequest):
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        self._check_capacity()
        try:
            return await self._preparer.prepare(request, self._registry.max_model_len())
        except ValueError as err:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None

    def _check_capacity(self) -> None:
        if len(self._active) >= self._limits.max_in_flight:
            raise RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"queue full: {len(self._active)} requests in flight "
                                f"(limits.max_in_flight = {self._limits.max_in_flight})")

    def _admit(self, prepared: PreparedRequest, admitted_s: float) -> ActiveRequest:
        # No await between this check and the insert: admission is atomic on the event loop.
        self._check_capacity()
        if prepared.request_id in self._active:
            raise RequestFailed(grpc.StatusCode.ALREADY_EXISTS,
                                f"request_id: {prepared.request_id!r} is already in flight")
        active = ActiveRequest(prepared, admitted_s)
        self._active[prepared.request_id] = active
        self._metrics.queue_depth.set(len(self._active))
        return active

    def _release(self, active: ActiveRequest) -> None:
        if self._active.get(active.request_id) is active:
            del self._active[active.request_id]
        self._metrics.queue_depth.set(len(self._active))

    # -- the unary methods --------------------------------------------------------

    async def abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        active = self._active.get(request.request_id)
        if active is None:
            return pb.AbortResponse(found=False)
        active.abort.set()  # the relay ends the stream with FINISH_REASON_ABORT and cancels the worker call
        return pb.AbortResponse(found=True)

    async def list_models(self, request: pb.ListModelsRequest,
                          context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        info = pb.ModelInfo(name=self._config.served_model_name, max_model_len=self._registry.max_model_len() or 0,
                            num_groups=len(self._registry.healthy_groups()))
        return pb.ListModelsResponse(models=[info])

    async def get_stats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.GetStatsResponse:
        return pb.GetStatsResponse(groups=[group_stats(g) for g in self._registry.groups()],
                                   queue_depth=len(self._active), requests_total=self.requests_total,
                                   router_prefix_hit_rate=self._router.prefix_hit_rate,
                                   disaggregation=self.disagg.stats.to_proto(self.disagg.links.num_opened))


def group_stats(group: GroupState) -> pb.GroupStats:
    stats = pb.GroupStats(name=group.name, role=group.role, healthy=group.healthy,
                          requests_routed=group.num_routed, in_flight=group.num_in_flight)
    status = group.status
    if status is not None:
        stats.num_running, stats.num_waiting = status.num_running, status.num_waiting
        stats.kv_usage, stats.prefix_hit_rate = status.kv_usage, status.prefix_hit_rate
        stats.num_kv_blocks, stats.num_free_kv_blocks = status.num_kv_blocks, status.num_free_kv_blocks
        stats.num_preemptions = status.num_preemptions
    return stats
