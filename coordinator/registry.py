"""The coordinator's view of its engine groups: who registered, where their
Worker service listens, whether they are healthy, how loaded they are.

A group is healthy from its Register until it stays silent for
`heartbeat_timeout_s` or one of its streams breaks; an unhealthy group is
"forgotten" (its next Heartbeat answers known=False) until it registers
again, which gives it a fresh channel and a fresh KV-event stream.

The registry also keeps the coordinator's own load numbers per group: the
requests it has in flight there and their KV blocks (the router's
`active_blocks`). It must not route, tokenize or talk to clients, and it
imports no model code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import grpc

from shardline.proto import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE_TOKENS = 16
CHANNEL_MAX_MESSAGE_BYTES = 64 << 20
STATUS_FETCH_TIMEOUT_S = 5.0
CHANNEL_CLOSE_GRACE_S = 1.0


@dataclass
class GroupState:
    name: str
    role: str
    address: str                      # host:port of the group's Worker service
    model: str
    tp: int
    pp: int
    stub: worker_pb2_grpc.WorkerStub | None = None
    channel: grpc.aio.Channel | None = None
    healthy: bool = True
    unhealthy_reason: str = ""
    last_heartbeat_s: float = 0.0     # time.monotonic() of the last Register or Heartbeat
    status: worker_pb2.WorkerStatus | None = None
    default_block_size_tokens: int = DEFAULT_BLOCK_SIZE_TOKENS  # from the cluster config, until a status says
    in_flight_blocks: dict[str, int] = field(default_factory=dict)  # coordinator request id -> KV blocks
    num_routed: int = 0

    @property
    def block_size_tokens(self) -> int:
        if self.status is not None and self.status.block_size_tokens:
            return self.status.block_size_tokens
        return self.default_block_size_tokens

    @property
    def active_blocks(self) -> int:
        return sum(self.in_flight_blocks.values())

    @property
    def num_in_flight(self) -> int:
        return len(self.in_flight_blocks)

    @property
    def kv_usage(self) -> float:
        return self.status.kv_usage if self.status is not None else 0.0

    @property
    def max_model_len(self) -> int | None:
        if self.status is not None and self.status.max_model_len:
            return self.status.max_model_len
        return None


GroupListener = Callable[[GroupState], None]


class Registry:
    def __init__(self, heartbeat_timeout_s: float, block_size_tokens_by_group: Mapping[str, int] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._block_sizes = dict(block_size_tokens_by_group or {})
        self._clock = clock
        self._groups: dict[str, GroupState] = {}
        self._changed = asyncio.Event()  # set on every register/heartbeat/health change
        self.on_registered: list[GroupListener] = []
        self.on_unhealthy: list[GroupListener] = []
        self.on_status: list[GroupListener] = []
        self._background: set[asyncio.Task] = set()

    # -- membership -----------------------------------------------------------

    def register(self, name: str, address: str, role: str, model: str, tp: int, pp: int) -> GroupState:
        """Adds or refreshes a group; a new channel unless a healthy group re-registers at the same address."""
        old = self._groups.get(name)
        state = GroupState(name=name, role=role or "mixed", address=address, model=model, tp=tp or 1,
                           pp=pp or 1, last_heartbeat_s=self._clock(),
                           default_block_size_tokens=self._block_sizes.get(name, DEFAULT_BLOCK_SIZE_TOKENS))
        if old is not None:
            state.status, state.num_routed = old.status, old.num_routed
            state.in_flight_blocks = old.in_flight_blocks
        if old is not None and old.healthy and old.address == address and old.channel is not None:
            state.channel, state.stub = old.channel, old.stub
        else:
            if old is not None and old.channel is not None:
                self._spawn(old.channel.close(grace=CHANNEL_CLOSE_GRACE_S))
            state.channel = grpc.aio.insecure_channel(address, options=[
                ("grpc.max_send_message_length", CHANNEL_MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", CHANNEL_MAX_MESSAGE_BYTES)])
            state.stub = worker_pb2_grpc.WorkerStub(state.channel)
        self._groups[name] = state
        log.info("group %s registered at %s (role %s)", name, address, state.role)
        self._spawn(self._fetch_status(state))
        self._notify(self.on_registered, state)
        return state

    def heartbeat(self, name: str, status: worker_pb2.WorkerStatus) -> bool:
        """False when the group is unknown or was marked unhealthy: it must register again."""
        state = self._groups.get(name)
        if state is None or not state.healthy:
            return False
        state.last_heartbeat_s = self._clock()
        self._set_status(state, status)
        return True

    def mark_unhealthy(self, name: str, reason: str) -> bool:
        """True when this call changed the group's health."""
        state = self._groups.get(name)
        if state is None or not state.healthy:
            return False
        state.healthy, state.unhealthy_reason = False, reason
        log.warning("group %s is unhealthy: %s", name, reason)
        self._notify(self.on_unhealthy, state)
        return True

    def expire_silent(self) -> list[str]:
        """Marks groups silent for longer than heartbeat_timeout_s unhealthy; returns their names."""
        now = self._clock()
        expired = [g.name for g in self._groups.values()
                   if g.healthy and now - g.last_heartbeat_s > self.heartbeat_timeout_s]
        for name in expired:
            self.mark_unhealthy(name, f"no heartbeat for {self.heartbeat_timeout_s:g} s")
        return expired

    async def monitor(self, interval_s: float) -> None:
        """Runs until cancelled: expires silent groups every `interval_s`."""
        while True:
            await asyncio.sleep(interval_s)
            self.expire_silent()

    # -- queries --------------------------------------------------------------

    def get(self, name: str) -> GroupState | None:
        return self._groups.get(name)

    def groups(self) -> list[GroupState]:
        return list(self._groups.values())

    def healthy_groups(self) -> list[GroupState]:
        return [g for g in self._groups.values() if g.healthy]

    def is_ready(self, names: list[str]) -> bool:
        """Every named group registered, healthy and with a known status."""
        return all((g := self._groups.get(n)) is not None and g.healthy and g.status is not None for n in names)

    def max_model_len(self) -> int | None:
        """The smallest context among healthy groups that reported one (a request must fit any of them)."""
        lengths = [g.max_model_len for g in self.healthy_groups() if g.max_model_len]
        return min(lengths) if lengths else None

    async def wait_changed(self, timeout_s: float) -> None:
        """Returns at the next membership or status change, or after `timeout_s`."""
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass

    # -- the coordinator's own load numbers -----------------------------------

    def add_request(self, name: str, request_id: str, num_blocks: int) -> None:
        state = self._groups[name]
        state.in_flight_blocks[request_id] = num_blocks
        state.num_routed += 1

    def update_request(self, name: str, request_id: str, num_blocks: int) -> None:
        state = self._groups.get(name)
        if state is not None and request_id in state.in_flight_blocks:
            state.in_flight_blocks[request_id] = num_blocks

    def remove_request(self, name: str, request_id: str) -> None:
        state = self._groups.get(name)
        if state is not None:
            state.in_flight_blocks.pop(request_id, None)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        for state in self._groups.values():
            if state.channel is not None:
                await state.channel.close(grace=None)

    # -- internals ------------------------------------------------------------

    def _set_status(self, state: GroupState, status: worker_pb2.WorkerStatus) -> None:
        state.status = status
        self._changed.set()
        self._notify(self.on_status, state)

    async def _fetch_status(self, state: GroupState) -> None:
        """Right after Register, so readiness need not wait for the first heartbeat."""
        try:
            status = await state.stub.GetStatus(worker_pb2.WorkerStatusRequest(), timeout=STATUS_FETCH_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            log.warning("group %s: GetStatus failed: %s %s", state.name, err.code().name, err.details())
            return
        if self._groups.get(state.name) is state:
            self._set_status(state, status)

    def _notify(self, listeners: list[GroupListener], state: GroupState) -> None:
        self._changed.set()
        for listener in listeners:
            try:
                listener(state)
            except Exception:  # a listener's bug must not break registration or health tracking
                log.exception("group listener failed for %s", state.name)

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
