"""One admitted request's trip through the engine groups: route it, stream
the chosen group's Generate to the client, and when that group's stream
breaks, resume on another healthy group from the prompt plus the tokens
already streamed (same sampling params, same seed), so the client's stream
goes on as if nothing happened.

Every wait is bounded: the worker call carries the client's remaining
deadline, and while a read is pending the relay wakes every
`stall_check_s` to notice an abort or a group marked unhealthy (silent
past its heartbeat timeout). Leaving by any path (finish, error, client
cancel) cancels the worker call, which aborts the request there and frees
its KV blocks.

A new request whose prompt is long enough for remote prefill (the
Disaggregator decides) asks its decode group to reserve blocks; once the
group says how much it caches, a prefill group computes the rest and pushes
the KV there, while the relay keeps reading the decode group's stream, whose
first token arrives with the commit. A failed prefill cancels that attempt
and the request starts over on a decode group, prefilled there.

Must not validate requests, tokenize, or answer the client's status itself:
failures leave as `RequestFailed` for the API layer.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import grpc

from shardline.coordinator.disagg import Disaggregator, RemotePrefillFailed
from shardline.coordinator.metrics import Metrics
from shardline.coordinator.registry import GroupState, Registry
from shardline.coordinator.router import Candidate, Route, Router
from shardline.coordinator.validation import PreparedRequest
from shardline.proto import shardline_pb2 as pb
from shardline.proto import worker_pb2

# Worker statuses that describe the request, not the group: passed to the client as they are.
_REQUEST_ERRORS = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS,
})

Send = Callable[[pb.GenerateResponse], Awaitable[None]]
TimeRemaining = Callable[[], "float | None"]


class RequestFailed(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class GroupLost(Exception):
    """The group's stream broke; the request may go on elsewhere."""


@dataclass
class ActiveRequest:
    prepared: PreparedRequest
    admitted_s: float
    abort: asyncio.Event = field(default_factory=asyncio.Event)
    token_ids: list[int] = field(default_factory=list)   # streamed to the client so far
    group: str | None = None                             # serving it now
    num_attempts: int = 0
    num_cached_tokens: int = 0
    last_token_s: float | None = None
    attempt_id: str = ""                                 # the request id of the current worker call
    force_local: bool = False                            # a remote prefill failed: prefill where it decodes

    @property
    def request_id(self) -> str:
        return self.prepared.request_id


class Relay:
    def __init__(self, registry: Registry, router: Router, metrics: Metrics, stall_check_s: float,
                 disagg: Disaggregator, clock: Callable[[], float] = time.monotonic):
        self._registry = registry
        self._router = router
        self._metrics = metrics
        self._disagg = disagg
        self._stall_check_s = stall_check_s
        self._clock = clock

    async def run(self, active: ActiveRequest, send: Send, time_remaining: TimeRemaining) -> int:
        """Streams the request to the end; returns its finish reason or raises RequestFailed."""
        failures: list[str] = []
        while True:
            if len(active.token_ids) >= active.prepared.params.max_tokens:  # broke right after the last token
                await send(self._final(active, pb.FINISH_REASON_LENGTH))
                return pb.FINISH_REASON_LENGTH
            group, route = self._pick(active)
            if group is None or len(failures) > len(self._registry.groups()):
                detail = f" ({'; '.join(failures)})" if failures else ""
                raise RequestFailed(grpc.StatusCode.UNAVAILABLE, f"no healthy engine group{detail}")
            prefill_group = self._prefill_group(active, group, route)
            try:
                return await self._attempt(group, active, send, time_remaining, prefill_group)
            except RemotePrefillFailed:
                active.force_local = True
            except GroupLost as lost:
                self._registry.mark_unhealthy(group.name, str(lost))
                failures.append(f"group {group.name}: {lost}")
                self._metrics.failovers.inc()

    def _pick(self, active: ActiveRequest) -> tuple[GroupState | None, Route | None]:
        """A group that decodes (role mixed or decode) and the router's prediction for it."""
        candidates = [Candidate(g.name, g.healthy, g.kv_usage, g.num_in_flight, g.active_blocks,
                                g.block_size_tokens) for g in self._registry.groups()
                      if g.stub is not None and g.role != "prefill"]
        route = self._router.choose(candidates, active.prepared.prompt_token_ids + active.token_ids)
        self._metrics.router_prefix_hit_rate.set(self._router.prefix_hit_rate)
        return (None, None) if route is None else (self._registry.get(route.group), route)

    def _prefill_group(self, active: ActiveRequest, group: GroupState, route: Route) -> GroupState | None:
        if active.token_ids or active.force_local:
            return None
        prefill_group = self._disagg.prefill_group_for(active.prepared.prompt_token_ids, group, route)
        if prefill_group is None:
            self._disagg.count_local()
        return prefill_group

    async def _attempt(self, group: GroupState, active: ActiveRequest, send: Send,
                       time_remaining: TimeRemaining, prefill_group: GroupState | None = None) -> int:
        timeout_s = time_remaining()
        if timeout_s is not None and timeout_s <= 0:
            raise RequestFailed(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        call = group.stub.Generate(self._worker_request(active, prefill_group is not None), timeout=timeout_s)
        self._registry.add_request(group.name, active.request_id, self._num_blocks(active, group))
        self._metrics.observe_load(group.name, group.num_in_flight, group.active_blocks)
        active.group = group.name
        abort_wait = asyncio.ensure_future(active.abort.wait())
        handoff = _Handoff()
        first = True
        try:
            while True:
                message = await self._next_message(call, group, abort_wait, handoff.pending())
                if message is None:
                    await send(self._final(active, pb.FINISH_REASON_ABORT))
                    return pb.FINISH_REASON_ABORT
                if message.HasField("reservation"):
                    handoff.task = self._start_prefill(message.reservation, prefill_group, group, active)
                    continue
                response = self._accept(active, group, message, first)
                if response is not None:
                    first = False
                    await send(response)
                if message.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    await handoff.settle()   # the decode group has the KV: the prefill's answer is due
                    return message.finish_reason
        finally:
            abort_wait.cancel()
            handoff.cancel()  # the prefill group aborts its request; its push to the decode group stops
            call.cancel()  # a no-op once finished; else the worker aborts the request and frees its blocks
            self._registry.remove_request(group.name, active.request_id)
            self._metrics.observe_load(group.name, group.num_in_flight, group.active_blocks)

    def _start_prefill(self, reservation: worker_pb2.KVReservation, prefill_group: GroupState | None,
                       group: GroupState, active: ActiveRequest) -> asyncio.Future | None:
        if prefill_group is None:
            return None
        if not reservation.reserved:   # no room for a reservation: the decode group prefills it
            self._disagg.count_local()
            return None
        return asyncio.ensure_future(self._disagg.prefill(
            prefill_group, group, active.attempt_id, active.prepared.prompt_token_ids, active.prepared.sampling,
            reservation.num_cached_tokens))

    async def _next_message(self, call, group: GroupState, abort_wait: asyncio.Future,
                            prefill: asyncio.Future | None = None):
        """The next WorkerGenerateResponse; None when the client aborted. RemotePrefillFailed
        when `prefill` (a remote prefill's task) fails first."""
        # A read task of its own: cancelling a pending read would cancel the whole call.
        read = asyncio.ensure_future(call.read())
        try:
            while True:
                watched = {read, abort_wait} | ({prefill} if prefill is not None and not prefill.done() else set())
                done, _ = await asyncio.wait(watched, timeout=self._stall_check_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                if read in done:
                    return self._checked(read, group)
                if abort_wait in done:
                    return None
                if prefill in done and prefill.exception() is not None:
                    raise prefill.exception()
                current = self._registry.get(group.name)
                if current is None or not current.healthy:
                    raise GroupLost(current.unhealthy_reason if current else "left the cluster")
        finally:
            if not read.done():
                read.cancel()

    def _checked(self, read: asyncio.Future, group: GroupState) -> worker_pb2.WorkerGenerateResponse:
        try:
            message = read.result()
        except grpc.aio.AioRpcError as err:
            code = err.code()
            if code in _REQUEST_ERRORS:
                raise RequestFailed(code, err.details() or code.name) from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise RequestFailed(code, "deadline exceeded") from None
            if code == grpc.StatusCode.ABORTED:   # its KV reservation expired: prefill it locally
                raise RemotePrefillFailed(f"group {group.name}: {err.details()}") from None
            raise GroupLost(f"{code.name}: {err.details()}") from None
        if message is grpc.aio.EOF:
            raise GroupLost("stream ended before the request finished")
        if message.error:
            raise RequestFailed(grpc.StatusCode.INTERNAL, f"group {group.name}: {message.error}")
        return message

    def _accept(self, active: ActiveRequest, group: GroupState, message: worker_pb2.WorkerGenerateResponse,
                first: bool) -> pb.GenerateResponse | None:
        """Records the message's tokens; the client's response, or None when there is nothing to send."""
        finished = message.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        if active.num_attempts == 1 and message.num_cached_tokens:
            active.num_cached_tokens = message.num_cached_tokens
        if message.token_ids:
            self._observe_tokens(active, len(message.token_ids))
            active.token_ids.extend(message.token_ids)
            self._registry.update_request(group.name, active.request_id, self._num_blocks(active, group))
        if not (message.token_ids or message.text or finished):
            return None
        response = pb.GenerateResponse(request_id=active.request_id, text=message.text,
                                       token_ids=message.token_ids, logprobs=message.logprobs,
                                       finish_reason=message.finish_reason, stop_reason=message.stop_reason,
                                       group=group.name if first else "")
        if finished:
            response.usage.CopyFrom(self._usage(active))
        return response

    def _observe_tokens(self, active: ActiveRequest, num_tokens: int) -> None:
        now = self._clock()
        if active.last_token_s is None:
            self._metrics.time_to_first_token_s.observe(now - active.admitted_s)
        else:
            gap_s = (now - active.last_token_s) / num_tokens
            for _ in range(num_tokens):
                self._metrics.inter_token_latency_s.observe(gap_s)
        active.last_token_s = now
        self._metrics.tokens_generated.inc(num_tokens)

    def _final(self, active: ActiveRequest, reason: int) -> pb.GenerateResponse:
        return pb.GenerateResponse(request_id=active.request_id, finish_reason=reason, usage=self._usage(active))

    def _usage(self, active: ActiveRequest) -> pb.Usage:
        return pb.Usage(prompt_tokens=len(active.prepared.prompt_token_ids),
                        completion_tokens=len(active.token_ids), cached_tokens=active.num_cached_tokens)

    def _worker_request(self, active: ActiveRequest, remote_prefill: bool) -> worker_pb2.WorkerGenerateRequest:
        active.num_attempts += 1
        # A fresh id per attempt: a group that lost and regained us may still hold the old one.
        suffix = "" if active.num_attempts == 1 else f".resume{active.num_attempts - 1}"
        active.attempt_id = active.request_id + suffix
        return worker_pb2.WorkerGenerateRequest(
            request_id=active.attempt_id, prompt_token_ids=active.prepared.prompt_token_ids,
            output_token_ids=active.token_ids, sampling=active.prepared.sampling,
            priority=active.prepared.priority, remote_prefill=remote_prefill)

    @staticmethod
    def _num_blocks(active: ActiveRequest, group: GroupState) -> int:
        num_tokens = len(active.prepared.prompt_token_ids) + len(active.token_ids)
        return math.ceil(num_tokens / group.block_size_tokens)


class _Handoff:
    """The remote prefill task of one attempt, if any."""

    def __init__(self) -> None:
        self.task: asyncio.Future | None = None

    def pending(self) -> asyncio.Future | None:
        return self.task

    async def settle(self, timeout_s: float = 2.0) -> None:
        """Lets a finished request's prefill call return (its statistics count)."""
        if self.task is not None and not self.task.done():
            await asyncio.wait({self.task}, timeout=timeout_s)

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
