"""`EngineLoop`: one LLMEngine driven by one dedicated thread, used from asyncio.

The engine is not thread-safe, so every call into it (add, abort, step,
KV-event collection, snapshots) runs on the engine thread. The asyncio side
sends commands through an inbox; the thread answers on asyncio futures and
per-request / per-subscriber queues, all through `loop.call_soon_threadsafe`
(one call per loop iteration). The thread sleeps on a condition while there
is nothing to do.

This module must not know about gRPC or protobuf (the servicer converts) and
must not make scheduling decisions (the engine's Scheduler does).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from shardline.worker.engine import LLMEngine
from shardline.worker.engine_streams import (_END, EngineFailed, EngineLimits, EngineStatus, EngineStopped,
                                             KVEventBatch, KVEventSubscription, RequestIdInUse, RequestStream)
from shardline.worker.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Command:
    run: Callable[[], Any]
    future: asyncio.Future | None = None


class EngineLoop:
    def __init__(self, engine: LLMEngine, max_pending_kv_batches: int = 4096, stall_wait_s: float = 0.005):
        self._engine = engine
        model = engine.local.model
        self.backend = model.backend
        self.limits = EngineLimits(vocab_size=model.config.vocab_size, max_model_len=engine.max_model_len,
                                   block_size_tokens=engine.config.block_size_tokens,
                                   num_kv_blocks=engine.num_kv_blocks,
                                   kv_shape=(model.config.num_layers, model.config.num_kv_heads,
                                             model.config.head_dim),
                                   kv_dtype=np.dtype(model.backend.storage_dtype).name)
        self._max_pending_kv_batches = max_pending_kv_batches
        self._stall_wait_s = stall_wait_s      # nap when requests exist but none could be scheduled
        self._cond = threading.Condition()
        self._inbox: deque[_Command] = deque()
        self._closing: BaseException | None = None   # set once: EngineStopped or EngineFailed
        self._streams: dict[str, RequestStream] = {}          # engine thread only
        self._subscribers: list[KVEventSubscription] = []     # engine thread only
        self._outbox: list[tuple[Callable[[Any], None], Any]] = []  # engine thread only
        self._status_stats: dict[str, float] = {}   # engine thread only: stats behind _status
        self._status = self._snapshot()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    # ---- asyncio side --------------------------------------------------

    def start(self) -> None:
        """Call from the event loop that will consume the outputs."""
        self._loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        self._thread.start()

    @property
    def failure(self) -> str | None:
        closing = self._closing
        return str(closing) if isinstance(closing, EngineFailed) else None

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def status(self) -> EngineStatus:
        """The snapshot taken after the latest engine step (never waits for the engine)."""
        return self._status

    async def add_request(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams,
                          output_token_ids: Sequence[int] = (), priority: int = 0, remote_prefill: bool = False,
                          kv_export_from: int | None = None) -> RequestStream:
        """Raises the engine's ValueError for a bad request, RequestIdInUse, or EngineStopped.
        `remote_prefill`: reserve blocks for pushed KV (see the stream's
        `reserved_cached_tokens`); `kv_export_from`: a prefill group's request
        (LLMEngine.add_request)."""
        stream = RequestStream(self, request_id)
        outputs = tuple(output_token_ids)
        try:
            await self._call(lambda: self._add(stream, prompt, params, outputs, priority, remote_prefill,
                                               kv_export_from))
        except asyncio.CancelledError:
            self.submit_abort(request_id, only_stream=stream)   # the engine may have taken it already
            raise
        return stream

    async def commit_remote_kv(self, request_id: str, start_token: int, k: np.ndarray, v: np.ndarray,
                               first_token_id: int, first_logprobs: dict[int, float] | None = None) -> None:
        """KeyError: no such reservation (aborted, expired); ValueError: the KV does not fit it."""
        await self._call(lambda: self._commit(request_id, start_token, k, v, first_token_id, first_logprobs))

    async def check_integrity(self) -> str:
        """The scheduler's and block manager's invariants: '' when they hold, else what broke."""
        return await self._call(self._integrity_error)

    async def abort(self, request_id: str) -> bool:
        """False when no live request has this id."""
        return await self._call(lambda: self._abort(request_id, None))

    def submit_abort(self, request_id: str, only_stream: RequestStream | None = None) -> None:
        """Fire and forget; with `only_stream`, only if that stream still owns the id."""
        self._submit(_Command(lambda: self._abort(request_id, only_stream)), quiet=True)

    async def subscribe_kv_events(self) -> KVEventSubscription:
        subscription = KVEventSubscription(self, self._max_pending_kv_batches)
        await self._call(lambda: self._subscribe(subscription))
        return subscription

    def submit_unsubscribe(self, subscription: KVEventSubscription) -> None:
        self._submit(_Command(lambda: self._unsubscribe(subscription)), quiet=True)

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Abort every request (their streams raise EngineStopped), end subscriptions, join the thread."""
        with self._cond:
            if self._closing is None:
                self._closing = EngineStopped("the worker is shutting down")
            self._cond.notify()
        if self._closed is None:
            return   # never started
        if self._thread.is_alive():
            await asyncio.wait_for(self._closed.wait(), timeout_s)
        self._thread.join(timeout_s)

    async def _call(self, run: Callable[[], Any]) -> Any:
        future = self._loop.create_future()
        self._submit(_Command(run, future))
        return await future

    def _submit(self, command: _Command, quiet: bool = False) -> None:
        with self._cond:
            if self._closing is not None:
                if quiet:
                    return    # the shutdown aborts everything anyway
                raise self._closing
            self._inbox.append(command)
            self._cond.notify()

    # ---- engine thread -------------------------------------------------

    def _run(self) -> None:
        progressed = True
        try:
            self._engine.local.model.backend.activate()   # the engine's GPU in this thread
            while True:
                commands = self._wait_for_work(progressed)
                if commands is None:
                    break
                for command in commands:
                    self._execute(command)
                progressed = self._step() or bool(commands)
                self._flush()
            self._shut_down(stopping=True)
        except Exception as exc:   # an engine bug: fail loudly, never hang the callers
            log.exception("engine step failed; the engine loop stops")
            with self._cond:
                self._closing = EngineFailed(f"engine failed: {type(exc).__name__}: {exc}")
            self._shut_down(stopping=False)
        finally:
            self._flush()
            self._post(lambda _: self._closed.set(), None)

    def _wait_for_work(self, progressed: bool) -> list[_Command] | None:
        """The pending commands (maybe none: step on), or None once stop() was called."""
        with self._cond:
            while not self._inbox and self._closing is None:
                if self._engine.has_unfinished():
                    if progressed:
                        break
                    self._cond.wait(self._stall_wait_s)   # nothing fit last step: do not spin
                    break
                self._cond.wait()
            if self._closing is not None:
                return None
            commands = list(self._inbox)
            self._inbox.clear()
            return commands

    def _execute(self, command: _Command) -> None:
        try:
            result, error = command.run(), None
        except Exception as exc:
            result, error = None, exc
        if command.future is not None:
            self._outbox.append((_resolve, (command.future, result, error)))
        elif error is not None:
            log.warning("engine command failed: %s", error)

    def _step(self) -> bool:
        """One engine step, its outputs and KV events queued for delivery; True if it scheduled
        or finished a plan."""
        before = self._status_stats["num_steps"], self._status_stats.get("num_steps_done")
        for output in self._engine.step():
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            self._outbox.append((stream._offer, output))
            if output.finished:
                del self._streams[output.request_id]
        self._queue_kv_events()
        self._status = self._snapshot()
        return (self._status_stats["num_steps"], self._status_stats.get("num_steps_done")) != before

    def _add(self, stream: RequestStream, prompt: str | Sequence[int], params: SamplingParams,
             output_token_ids: tuple[int, ...], priority: int, remote_prefill: bool,
             kv_export_from: int | None) -> None:
        if stream.request_id in self._streams:
            raise RequestIdInUse(f"request_id {stream.request_id!r} is already in use")
        if remote_prefill and not output_token_ids:
            stream.reserved_cached_tokens = self._engine.reserve_remote_kv(stream.request_id, prompt, params, priority)
        else:
            self._engine.add_request(stream.request_id, prompt, params, priority, output_token_ids,
                                     kv_export_from=kv_export_from)
        self._streams[stream.request_id] = stream

    def _commit(self, request_id: str, start_token: int, k: np.ndarray, v: np.ndarray, first_token_id: int,
                first_logprobs: dict[int, float] | None) -> None:
        if request_id not in self._streams:
            raise KeyError(f"request_id: {request_id!r} holds no KV reservation here")
        self._engine.commit_remote_kv(request_id, start_token, k, v, first_token_id, first_logprobs)

    def _integrity_error(self) -> str:
        try:
            self._engine.scheduler.check_integrity()
        except AssertionError as err:
            return str(err) or "integrity check failed"
        return ""

    def _abort(self, request_id: str, only_stream: RequestStream | None) -> bool:
        stream = self._streams.get(request_id)
        if stream is None or (only_stream is not None and stream is not only_stream):
            return False
        return self._engine.abort(request_id)   # its finished output arrives with the next step

    def _subscribe(self, subscription: KVEventSubscription) -> None:
        self._queue_kv_events()   # events so far belong to the existing subscribers
        snapshot = frozenset(self._engine.block_manager.cached_block_hashes())
        self._outbox.append((subscription._offer, KVEventBatch(0, (), snapshot)))
        subscription.next_sequence_number = 1
        self._subscribers.append(subscription)

    def _unsubscribe(self, subscription: KVEventSubscription) -> None:
        if subscription in self._subscribers:
            self._subscribers.remove(subscription)
            self._outbox.append((subscription._offer, _END))

    def _queue_kv_events(self) -> None:
        events = tuple(self._engine.block_manager.take_events())   # taken even with no subscriber
        if not events:
            return
        for subscription in self._subscribers:
            batch = KVEventBatch(subscription.next_sequence_number, events)
            subscription.next_sequence_number += 1
            self._outbox.append((subscription._offer, batch))

    def _snapshot(self) -> EngineStatus:
        stats = self._status_stats = self._engine.stats()
        return EngineStatus(
            num_running=int(stats["num_running"]), num_waiting=int(stats["num_waiting"]),
            num_kv_blocks=self._engine.num_kv_blocks,
            num_free_kv_blocks=self._engine.block_manager.num_free_blocks,
            kv_usage=float(stats["kv_usage"]), prefix_hit_rate=float(stats["prefix_hit_rate"]),
            num_preemptions=int(stats["num_preemptions"]), num_reserved=int(stats.get("num_reserved", 0)))

    def _shut_down(self, stopping: bool) -> None:
        """Abort what is left and end every stream and subscription with the closing error."""
        closing = self._closing
        if stopping:
            for request_id in list(self._streams):
                self._engine.abort(request_id)
            self._engine.step()   # nothing left to schedule: only drops the aborted requests
            self._engine.block_manager.take_events()
            self._status = self._snapshot()
            self._engine.shutdown()   # a tensor-parallel group's followers stop with the leader
        for stream in self._streams.values():
            self._outbox.append((stream._offer, closing))
        for subscription in self._subscribers:
            self._outbox.append((subscription._offer, closing))
        self._streams.clear()
        self._subscribers.clear()
        with self._cond:
            rejected, self._inbox = list(self._inbox), deque()
        for command in rejected:
            if command.future is not None:
                self._outbox.append((_resolve, (command.future, None, closing)))

    def _flush(self) -> None:
        if self._outbox:
            outbox, self._outbox = self._outbox, []
            self._post(_deliver_all, outbox)

    def _post(self, callback: Callable[[Any], None], argument: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, argument)
        except RuntimeError:   # the event loop is closed: nobody is listening any more
            pass


def _deliver_all(outbox: list[tuple[Callable[[Any], None], Any]]) -> None:
    for deliver, item in outbox:
        deliver(item)


def _resolve(args: tuple[asyncio.Future, Any, BaseException | None]) -> None:
    future, result, error = args
    if future.done():   # the caller was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
