"""PrefixIndex: snapshots replace a group's entries, stored/removed events
update them, a sequence-number gap drops them until a fresh snapshot; and
KVEventFollower reopens a stream after a gap and reports a broken one."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from shardline.coordinator.prefix_index import KVEventFollower, PrefixIndex
from shardline.proto import worker_pb2 as wpb
from shardline.proto import worker_pb2_grpc
from shardline.worker.block_hash import block_hashes

STORED, REMOVED = wpb.KVEvent.KIND_STORED, wpb.KVEvent.KIND_REMOVED


def snapshot(seq: int, hashes) -> wpb.KVEventBatch:
    return wpb.KVEventBatch(sequence_number=seq, snapshot=True, snapshot_hashes=list(hashes))


def events(seq: int, *pairs) -> wpb.KVEventBatch:
    return wpb.KVEventBatch(sequence_number=seq, events=[wpb.KVEvent(kind=k, block_hashes=list(h)) for k, h in pairs])


def test_snapshot_then_events():
    index = PrefixIndex()
    chain = block_hashes(list(range(64)), 16)  # 4 blocks
    assert index.apply("a", snapshot(7, chain[:2]))
    assert index.cached_blocks("a", chain) == 2
    assert index.apply("a", events(8, (STORED, chain[2:])))
    assert index.cached_blocks("a", chain) == 4
    assert index.apply("a", events(9, (REMOVED, [chain[1]])))
    assert index.cached_blocks("a", chain) == 1  # a hole cuts the prefix chain
    assert index.groups_holding(chain[0]) == {"a"}
    assert index.groups_holding(chain[1]) == frozenset()
    assert index.cached_blocks("b", chain) == 0


def test_snapshot_replaces_what_was_known():
    index = PrefixIndex()
    index.apply("a", snapshot(1, [11, 12]))
    index.apply("b", snapshot(1, [11]))
    index.apply("a", snapshot(50, [13]))
    assert index.num_blocks("a") == 1
    assert index.groups_holding(11) == {"b"}
    assert index.groups_holding(13) == {"a"}


def test_gap_drops_the_group_until_a_snapshot():
    index = PrefixIndex()
    index.apply("a", snapshot(1, [1, 2, 3]))
    index.apply("b", snapshot(1, [1]))
    assert not index.apply("a", events(3, (STORED, [4])))  # 2 went missing
    assert index.num_blocks("a") == 0 and not index.in_sync("a")
    assert index.groups_holding(1) == {"b"}
    assert not index.apply("a", events(4, (STORED, [5])))  # still no snapshot: still out of sync
    assert index.apply("a", snapshot(9, [1, 5]))
    assert index.groups_holding(1) == {"a", "b"} and index.num_gaps == 2


def test_events_before_any_snapshot_are_a_gap():
    index = PrefixIndex()
    assert not index.apply("a", events(0, (STORED, [1])))
    assert index.num_blocks("a") == 0


def test_snapshot_batch_may_carry_events_after_it():
    index = PrefixIndex()
    batch = snapshot(4, [1, 2])
    batch.events.append(wpb.KVEvent(kind=REMOVED, block_hashes=[2]))
    assert index.apply("a", batch)
    assert index.num_blocks("a") == 1
    assert index.apply("a", events(5))


class _ScriptedWorker(worker_pb2_grpc.WorkerServicer):
    """Serves one scripted list of batches per StreamKVEvents call, then holds or fails the stream."""

    def __init__(self, scripts):
        self.scripts = list(scripts)
        self.calls = 0

    async def StreamKVEvents(self, request, context):
        script = self.scripts[min(self.calls, len(self.scripts) - 1)]
        self.calls += 1
        for batch in script:
            yield batch
        if self.calls >= len(self.scripts):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker going away")
        await asyncio.sleep(30)


async def _follow(scripts, until) -> tuple[dict, list, _ScriptedWorker]:
    """Follows until `until(index, broken)`; returns who held hashes 1..5 then (closing drops them)."""
    server = grpc.aio.server()
    worker = _ScriptedWorker(scripts)
    worker_pb2_grpc.add_WorkerServicer_to_server(worker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    index, broken = PrefixIndex(), []
    follower = KVEventFollower(index, on_broken=lambda g, why: broken.append((g, why)), reopen_delay_s=0.01)
    try:
        follower.follow("a", worker_pb2_grpc.WorkerStub(channel))
        for _ in range(200):
            if until(index, broken):
                break
            await asyncio.sleep(0.01)
        return {h: index.groups_holding(h) for h in range(1, 6)}, broken, worker
    finally:
        await follower.close()
        await channel.close()
        await server.stop(0)


def test_follower_reopens_after_a_gap_and_reports_a_broken_stream():
    first = [snapshot(1, [1, 2]), events(2, (STORED, [3])), events(5, (STORED, [4]))]  # 3 and 4 missing
    second = [snapshot(10, [1, 2, 3, 4, 5])]
    held, broken, worker = asyncio.run(_follow([first, second], until=lambda i, b: b))
    assert worker.calls == 2  # reopened once for the snapshot
    assert broken and broken[0][0] == "a" and "UNAVAILABLE" in broken[0][1]
    assert not any(held.values())  # a broken stream's group is dropped


def test_follower_keeps_an_open_stream_in_sync():
    script = [snapshot(1, [1]), events(2, (STORED, [2, 3])), events(3, (REMOVED, [1]))]
    held, broken, worker = asyncio.run(_follow([script, script], until=lambda i, b: i.num_blocks("a") == 2))
    assert not broken and worker.calls == 1
    assert held[2] == held[3] == {"a"} and held[1] == frozenset()


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
