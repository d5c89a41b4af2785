"""Which engine group holds which prefix blocks, for the KV-aware router.

`PrefixIndex` maps block hashes (the chain of `worker/block_hash.py`) to the
groups that cache them. It is fed by each group's StreamKVEvents: a
snapshot replaces what the index knew of that group; `stored` / `removed`
events update it; a gap in the sequence numbers drops the group's entries
(the index would otherwise believe in blocks long evicted) and asks for a
fresh snapshot. `KVEventFollower` runs one stream per group and reopens it
after a gap or when the worker drops a lagging reader (ABORTED).

Pure bookkeeping plus the stream readers: no routing decisions, no model
code, no health policy beyond reporting a stream that broke.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Sequence

import grpc

from shardline.proto import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

REOPEN_DELAY_S = 0.2


class PrefixIndex:
    def __init__(self) -> None:
        self._groups_by_hash: dict[int, set[str]] = {}
        self._hashes_by_group: dict[str, set[int]] = {}
        self._next_sequence: dict[str, int] = {}  # groups in sync: the sequence number expected next
        self.num_gaps = 0

    def apply(self, group: str, batch: worker_pb2.KVEventBatch) -> bool:
        """Applies one batch. False on a gap (or events before any snapshot): the
        group's entries are dropped and its stream must be reopened for a snapshot."""
        if batch.snapshot:
            self.drop_group(group)
            self._store(group, batch.snapshot_hashes)
        elif self._next_sequence.get(group) != batch.sequence_number:
            log.info("group %s: KV event gap (expected %s, got %d); resyncing", group,
                     self._next_sequence.get(group, "a snapshot"), batch.sequence_number)
            self.drop_group(group)
            self.num_gaps += 1
            return False
        for event in batch.events:
            if event.kind == worker_pb2.KVEvent.KIND_STORED:
                self._store(group, event.block_hashes)
            elif event.kind == worker_pb2.KVEvent.KIND_REMOVED:
                self._remove(group, event.block_hashes)
        self._next_sequence[group] = batch.sequence_number + 1
        return True

    def drop_group(self, group: str) -> None:
        self._next_sequence.pop(group, None)
        for block_hash in self._hashes_by_group.pop(group, set()):
            holders = self._groups_by_hash.get(block_hash)
            if holders is not None:
                holders.discard(group)
                if not holders:
                    del self._groups_by_hash[block_hash]

    def cached_blocks(self, group: str, prompt_hashes: Sequence[int]) -> int:
        """Length of the longest prefix of `prompt_hashes` that `group` caches."""
        held = self._hashes_by_group.get(group)
        if not held:
            return 0
        count = 0
        for block_hash in prompt_hashes:
            if block_hash not in held:
                break
            count += 1
        return count

    def groups_holding(self, block_hash: int) -> frozenset[str]:
        return frozenset(self._groups_by_hash.get(block_hash, ()))

    def num_blocks(self, group: str) -> int:
        return len(self._hashes_by_group.get(group, ()))

    def in_sync(self, group: str) -> bool:
        return group in self._next_sequence

    def _store(self, group: str, hashes: Sequence[int]) -> None:
        held = self._hashes_by_group.setdefault(group, set())
        for block_hash in hashes:
            held.add(block_hash)
            self._groups_by_hash.setdefault(block_hash, set()).add(group)

    def _remove(self, group: str, hashes: Sequence[int]) -> None:
        held = self._hashes_by_group.get(group, set())
        for block_hash in hashes:
            held.discard(block_hash)
            holders = self._groups_by_hash.get(block_hash)
            if holders is not None:
                holders.discard(group)
                if not holders:
                    del self._groups_by_hash[block_hash]


BrokenStreamHandler = Callable[[str, str], None]  # (group, reason)


class KVEventFollower:
    """One StreamKVEvents reader task per group, feeding a PrefixIndex."""

    def __init__(self, index: PrefixIndex, on_broken: BrokenStreamHandler, reopen_delay_s: float = REOPEN_DELAY_S):
        self._index = index
        self._on_broken = on_broken
        self._reopen_delay_s = reopen_delay_s
        self._tasks: dict[str, asyncio.Task] = {}

    def follow(self, group: str, stub: worker_pb2_grpc.WorkerStub) -> None:
        """(Re)starts the group's reader; any previous one stops first."""
        self.stop(group)
        self._tasks[group] = asyncio.ensure_future(self._run(group, stub))

    def stop(self, group: str) -> None:
        task = self._tasks.pop(group, None)
        if task is not None:
            task.cancel()
        self._index.drop_group(group)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for group in list(self._tasks):
            self.stop(group)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, group: str, stub: worker_pb2_grpc.WorkerStub) -> None:
        while True:
            call = stub.StreamKVEvents(worker_pb2.KVEventsRequest())
            try:
                reason = await self._read(group, call)
            except grpc.aio.AioRpcError as err:
                self._index.drop_group(group)
                if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.warning("group %s sends no KV events; routing it by load only", group)
                    return
                # ABORTED: we fell behind and the worker dropped us; a new stream resyncs.
                reason = None if err.code() == grpc.StatusCode.ABORTED else \
                    f"KV event stream broke: {err.code().name}: {err.details()}"
            finally:
                call.cancel()
            if reason is not None:
                self._index.drop_group(group)
                self._on_broken(group, reason)
                return
            await asyncio.sleep(self._reopen_delay_s)

    async def _read(self, group: str, call) -> str | None:
        """None when the stream must be reopened (a gap); else why it ended."""
        async for batch in call:
            if not self._index.apply(group, batch):
                return None
        return "KV event stream ended"
