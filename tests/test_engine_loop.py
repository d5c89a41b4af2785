"""EngineLoop over a scripted fake engine (no model): outputs in order, abort
and close, KV-event fan-out with a snapshot first, no stepping while idle,
clean stop with requests in flight, and an engine that raises."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from shardline.worker.block_manager import KVEvent
from shardline.worker.engine import EngineOutput
from shardline.worker.engine_loop import EngineLoop
from shardline.worker.engine_streams import EngineFailed, EngineStopped, RequestIdInUse
from shardline.worker.sampling_params import SamplingParams


class FakeEngine:
    """Each request emits token 7 once per step until max_tokens; each step stores one block hash."""

    def __init__(self, step_s: float = 0.001):
        config = SimpleNamespace(vocab_size=100, num_layers=1, num_kv_heads=1, head_dim=4)
        self.local = SimpleNamespace(model=SimpleNamespace(config=config, backend=SimpleNamespace(
            activate=lambda: None, storage_dtype="float32")))
        self.config = SimpleNamespace(block_size_tokens=4)
        self.max_model_len, self.num_kv_blocks, self.num_free_blocks = 64, 8, 8
        self.block_manager = self
        self.step_s, self.fail = step_s, False
        self.num_steps = 0
        self._left: dict[str, int] = {}
        self._pending: list[EngineOutput] = []
        self._events: list[KVEvent] = []
        self._hashes: set[int] = set()

    def add_request(self, request_id, prompt, params, priority=0, output_token_ids=(), kv_export_from=None):
        self._left[request_id] = params.max_tokens - len(output_token_ids)

    def abort(self, request_id: str) -> bool:
        if self._left.pop(request_id, None) is None:
            return False
        self._pending.append(EngineOutput(request_id, [], "", True, "abort"))
        return True

    def has_unfinished(self) -> bool:
        return bool(self._left)

    def shutdown(self) -> None:
        self.shut_down = True

    def step(self) -> list[EngineOutput]:
        if self.fail:
            raise RuntimeError("boom")
        time.sleep(self.step_s)
        outputs, self._pending = self._pending, []
        if self._left:
            self.num_steps += 1
            self._events.append(KVEvent("stored", (self.num_steps,)))
            self._hashes.add(self.num_steps)
        for request_id in list(self._left):
            self._left[request_id] -= 1
            finished = self._left[request_id] == 0
            if finished:
                del self._left[request_id]
            outputs.append(EngineOutput(request_id, [7], "x", finished, "length" if finished else None))
        return outputs

    def stats(self) -> dict:
        return {"num_running": len(self._left), "num_waiting": 0, "kv_usage": 0.0, "prefix_hit_rate": 0.0,
                "num_preemptions": 0, "num_steps": self.num_steps}

    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    def cached_block_hashes(self) -> frozenset[int]:
        return frozenset(self._hashes)


def run(scenario):
    async def main():
        engine = FakeEngine()
        loop = EngineLoop(engine)
        loop.start()
        try:
            await asyncio.wait_for(scenario(loop, engine), 10)
        finally:
            await loop.stop()
    asyncio.run(main())


def test_outputs_in_order_then_the_thread_sleeps():
    async def scenario(loop, engine):
        streams = [await loop.add_request(f"r{n}", [1, 2], SamplingParams(max_tokens=n)) for n in (3, 5)]
        for stream, n in zip(streams, (3, 5)):
            outputs = [out async for out in stream]
            assert [o.new_token_ids for o in outputs] == [[7]] * n and outputs[-1].finish_reason == "length"
        with pytest.raises(RequestIdInUse):
            await loop.add_request("r9", [1], SamplingParams(max_tokens=100))
            await loop.add_request("r9", [1], SamplingParams(max_tokens=100))
        assert await loop.abort("r9") and not await loop.abort("r9")
        await asyncio.sleep(0.05)
        steps = engine.num_steps
        await asyncio.sleep(0.2)
        assert engine.num_steps == steps and loop.status().num_running == 0   # idle: no stepping
    run(scenario)


def test_close_aborts_and_the_abort_output_ends_the_stream():
    async def scenario(loop, engine):
        stream = await loop.add_request("a", [1], SamplingParams(max_tokens=10**6))
        first = await stream.__anext__()
        assert first.new_token_ids == [7] and not first.finished
        assert await loop.abort("a")
        assert [o.finish_reason async for o in stream][-1] == "abort"
        closed = await loop.add_request("b", [1], SamplingParams(max_tokens=10**6))
        await closed.__anext__()
        closed.close()
        while loop.status().num_running:
            await asyncio.sleep(0.01)
    run(scenario)


def test_kv_events_snapshot_first_then_consecutive_batches():
    async def scenario(loop, engine):
        early = await loop.subscribe_kv_events()
        assert (await early.__anext__()).snapshot_hashes == frozenset()
        [out async for out in await loop.add_request("k", [1], SamplingParams(max_tokens=4))]
        batches = [await early.__anext__() for _ in range(4)]
        assert [b.sequence_number for b in batches] == [1, 2, 3, 4]
        assert [h for b in batches for e in b.events for h in e.block_hashes] == [1, 2, 3, 4]
        late = await loop.subscribe_kv_events()
        snapshot = await late.__anext__()
        assert snapshot.is_snapshot and snapshot.sequence_number == 0 and snapshot.snapshot_hashes == {1, 2, 3, 4}
        early.close()
        assert [b async for b in early] == []
    run(scenario)


def test_stop_ends_in_flight_streams_and_refuses_new_work():
    async def main():
        engine = FakeEngine()
        loop = EngineLoop(engine)
        loop.start()
        stream = await loop.add_request("s", [1], SamplingParams(max_tokens=10**6))
        subscription = await loop.subscribe_kv_events()
        await stream.__anext__()
        await loop.stop()
        with pytest.raises(EngineStopped):
            async for _ in stream:
                pass
        with pytest.raises(EngineStopped):
            async for _ in subscription:
                pass
        with pytest.raises(EngineStopped):
            await loop.add_request("t", [1], SamplingParams(max_tokens=2))
        assert not engine.has_unfinished() and loop.failure is None
    asyncio.run(asyncio.wait_for(main(), 10))


def test_an_engine_that_raises_fails_every_stream():
    async def scenario(loop, engine):
        stream = await loop.add_request("f", [1], SamplingParams(max_tokens=10**6))
        await stream.__anext__()
        engine.fail = True
        with pytest.raises(EngineFailed, match="boom"):
            async for _ in stream:
                pass
        await loop.wait_closed()
        assert "boom" in loop.failure
        with pytest.raises(EngineFailed):
            await loop.add_request("g", [1], SamplingParams(max_tokens=2))
    run(scenario)
