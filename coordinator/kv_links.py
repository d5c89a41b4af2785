"""Which transport a KV hand-off takes, and the pair links the coordinator brokers.

`disaggregation.transport`: `auto` takes an NCCL link when both leaders
can open one (both on GPUs, unless SHARDLINE_GPU_OFF names nccl_links on a
worker), else the PushKV stream itself (`grpc`);
`nccl` or `tcp` ask for that link kind, falling back to `grpc` where a
leader cannot open it; `grpc` never opens links.

A link serves one (prefill group, decode group) pair, opened on first use:
the decode leader (rank 1) makes the unique id, this broker hands it to the
prefill leader (rank 0). Links are cached, dropped on both sides after a
failed or timed-out transfer, and dropped when either group turns
unhealthy or registers anew (a restarted leader has none). A pair whose
link fails to open pushes over gRPC for RETRY_AFTER_S before the next try.

Must not route or count hand-offs (the Disaggregator does).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc

from shardline.coordinator.registry import GroupState, Registry
from shardline.proto import worker_pb2

log = logging.getLogger(__name__)
OPEN_TIMEOUT_S = 60.0     # NCCL setup of a fresh pair takes seconds
CLOSE_TIMEOUT_S = 5.0
RETRY_AFTER_S = 30.0      # a pair whose link failed to open pushes over gRPC this long before trying again


class KVLinkBroker:
    def __init__(self, transport: str, registry: Registry):
        self.transport = transport
        self._registry = registry
        self._links: dict[tuple[str, str], str] = {}          # (prefill, decode) -> link id
        self._opening: dict[tuple[str, str], asyncio.Future] = {}
        self._retry_at: dict[tuple[str, str], float] = {}     # pairs whose last open failed
        self._background: set[asyncio.Task] = set()
        self.num_opened = 0
        registry.on_unhealthy.append(self.forget_group)
        registry.on_registered.append(self.forget_group)

    def transport_for(self, prefill: GroupState, decode: GroupState) -> str | None:
        """The link transport for this pair, or None: push over the PushKV stream."""
        if self.transport == "grpc" or prefill.status is None or decode.status is None:
            return None
        common = set(prefill.status.kv_transports) & set(decode.status.kv_transports)
        wanted = "nccl" if self.transport == "auto" else self.transport
        return wanted if wanted in common else None

    async def link_for(self, prefill: GroupState, decode: GroupState) -> str:
        """The pair's link id, opened on first use; '' (push over the stream) when the pair
        takes no link or opening one failed."""
        transport = self.transport_for(prefill, decode)
        if transport is None:
            return ""
        key = (prefill.name, decode.name)
        if key in self._links:
            return self._links[key]
        if time.monotonic() < self._retry_at.get(key, 0.0):
            return ""
        if key not in self._opening:
            self._opening[key] = asyncio.ensure_future(self._open(key, prefill, decode, transport))
        return await asyncio.shield(self._opening[key])

    async def _open(self, key: tuple[str, str], prefill: GroupState, decode: GroupState, transport: str) -> str:
        link_id = f"{prefill.name}->{decode.name}#{uuid.uuid4().hex[:8]}"
        try:
            opened = await decode.stub.OpenKVLink(worker_pb2.OpenKVLinkRequest(
                link_id=link_id, transport=transport, rank=1), timeout=OPEN_TIMEOUT_S)
            await prefill.stub.OpenKVLink(worker_pb2.OpenKVLinkRequest(
                link_id=link_id, transport=transport, rank=0, unique_id=opened.unique_id), timeout=OPEN_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            log.warning("KV link %s (%s) did not open: %s %s; pushing over gRPC for %.0f s", link_id, transport,
                        err.code().name, err.details(), RETRY_AFTER_S)
            self._close_ends(link_id, prefill.name, decode.name)
            self._retry_at[key] = time.monotonic() + RETRY_AFTER_S
            return ""
        finally:
            self._opening.pop(key, None)
        if self._registry.get(prefill.name) is not prefill or self._registry.get(decode.name) is not decode \
                or not (prefill.healthy and decode.healthy):
            self._close_ends(link_id, prefill.name, decode.name)   # a group left while it opened
            return ""
        log.info("KV link %s open (%s)", link_id, transport)
        self._links[key] = link_id
        self.num_opened += 1
        return link_id

    def drop(self, link_id: str) -> None:
        """Closes a link on both sides (after a failed transfer): the next hand-off opens a new one."""
        for key, known in list(self._links.items()):
            if known == link_id:
                del self._links[key]
                self._close_ends(link_id, *key)

    def forget_group(self, group: GroupState) -> None:
        for key in [key for key in self._retry_at if group.name in key]:
            del self._retry_at[key]   # a group that came back gets a fresh try
        for key, link_id in list(self._links.items()):
            if group.name in key:
                del self._links[key]
                self._close_ends(link_id, *key)

    def open_links(self) -> dict[tuple[str, str], str]:
        return dict(self._links)

    def _close_ends(self, link_id: str, *groups: str) -> None:
        for name in groups:
            state = self._registry.get(name)
            if state is not None and state.stub is not None:
                task = asyncio.ensure_future(self._close_end(state, link_id))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    @staticmethod
    async def _close_end(state: GroupState, link_id: str) -> None:
        try:
            await state.stub.CloseKVLink(worker_pb2.CloseKVLinkRequest(link_id=link_id), timeout=CLOSE_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:   # the group is gone: so is its end
            log.info("closing KV link %s on %s: %s", link_id, state.name, err.code().name)
