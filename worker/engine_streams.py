"""What EngineLoop hands to asyncio callers: per-request output streams,
KV-event subscriptions, status snapshots, limits, and the errors that end
them. These live on the asyncio side; only `_offer` is called (through
`call_soon_threadsafe`) on behalf of the engine thread. No engine calls here.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shardline.worker.block_manager import KVEvent
from shardline.worker.engine import EngineOutput

if TYPE_CHECKING:
    from shardline.worker.engine_loop import EngineLoop


class EngineStopped(RuntimeError):
    """The loop is shutting down or has stopped: the request did not run to its end."""


class EngineFailed(RuntimeError):
    """The engine raised inside a step; the loop is dead and every stream ends with this."""


class RequestIdInUse(ValueError):
    """Another live request already has this id."""


class SubscriberLagged(RuntimeError):
    """A KV-event subscriber fell too far behind; it must subscribe again (and get a snapshot)."""


@dataclass(frozen=True)
class EngineLimits:
    """Fixed once the engine exists; safe to read from any thread."""

    vocab_size: int
    max_model_len: int
    block_size_tokens: int
    num_kv_blocks: int
    kv_shape: tuple[int, int, int] = (0, 0, 0)   # per token: (layers, KV heads, head dim), all ranks
    kv_dtype: str = "float32"                    # the cache's storage dtype


@dataclass(frozen=True)
class EngineStatus:
    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_free_kv_blocks: int
    kv_usage: float
    prefix_hit_rate: float
    num_preemptions: int
    num_reserved: int = 0


@dataclass(frozen=True)
class KVEventBatch:
    sequence_number: int                        # per subscription: 0 is the snapshot, then +1 each
    events: tuple[KVEvent, ...]
    snapshot_hashes: frozenset[int] | None = None  # set on the first batch only: all cached hashes

    @property
    def is_snapshot(self) -> bool:
        return self.snapshot_hashes is not None


_END = object()   # queue marker: the subscription ended normally


class RequestStream:
    """The outputs of one request in order; the last one has `finished=True`.

    Iteration raises EngineStopped / EngineFailed if the loop ends first.
    `close()` aborts the request in the engine unless it already finished.
    """

    def __init__(self, owner: EngineLoop, request_id: str):
        self.request_id = request_id
        # A remote-prefill request: leading prompt tokens cached here, or None if it prefills here.
        self.reserved_cached_tokens: int | None = None
        self._owner = owner
        self._queue: asyncio.Queue[EngineOutput | BaseException] = asyncio.Queue()
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> EngineOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.finished
        return item

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._owner.submit_abort(self.request_id, only_stream=self)

    def _offer(self, item: EngineOutput | BaseException) -> None:
        self._queue.put_nowait(item)


class KVEventSubscription:
    """Batches of KV events, the first a snapshot; consecutive sequence numbers."""

    def __init__(self, owner: EngineLoop, max_pending_batches: int):
        self._owner = owner
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._max_pending_batches = max_pending_batches
        self._lagged = False
        self.next_sequence_number = 0    # written by the engine thread only

    def __aiter__(self) -> KVEventSubscription:
        return self

    async def __anext__(self) -> KVEventBatch:
        item = await self._queue.get()
        if isinstance(item, KVEventBatch):
            return item
        self._queue.put_nowait(item)   # the end (or the error) stays for any later call
        raise StopAsyncIteration if item is _END else item

    def close(self) -> None:
        self._owner.submit_unsubscribe(self)

    def _offer(self, item: Any) -> None:
        if self._lagged:
            return
        if isinstance(item, KVEventBatch) and self._queue.qsize() >= self._max_pending_batches:
            self._lagged, item = True, SubscriberLagged(
                f"KV event subscriber fell {self._queue.qsize()} batches behind; subscribe again")
            self.close()
        self._queue.put_nowait(item)
