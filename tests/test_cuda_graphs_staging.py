"""The graphed decode step's staging (worker/cuda_graphs.py), on the host alone: the packed
layout and the turns of its two buffers (kernels/staging.py, shared with ops.upload), a
plan's inputs written into a bucket's staging arrays with the padding after its rows,
whatever an earlier (wider) plan left there, and the buckets' sizes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from shardline.kernels.staging import CopyTurns, packed_layout, views
from shardline.worker.cuda_graphs import DecodeGraphs, _Bucket, _fill, _idle_inputs, _Staging, graph_buckets
from shardline.worker.plan_builder import build_step_plan
from shardline.worker.request import Request
from shardline.worker.sampling_params import SamplingParams

SIZE, MAX_BLOCKS, BLOCK = 8, 6, 4


def decoding(request_id: str, prompt: int, seed: int) -> Request:
    request = Request(request_id, tuple(range(1, prompt + 1)), SamplingParams(max_tokens=8, seed=seed, top_k=5),
                      output_token_ids=[7])
    request.num_computed_tokens = prompt   # the output token is the one to compute
    return request


def staging_views() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    idle = _idle_inputs(SIZE, MAX_BLOCKS)
    offsets, nbytes = packed_layout(idle)
    arrays = views(np.zeros(nbytes, np.uint8), offsets, idle)
    for name, value in idle.items():
        arrays[name][...] = value
    return arrays, idle


def test_layout_packs_every_array_aligned_and_apart():
    idle = _idle_inputs(SIZE, MAX_BLOCKS)
    offsets, nbytes = packed_layout(idle)
    spans = sorted((at, at + idle[name].nbytes) for name, at in offsets.items())
    assert all(at % 16 == 0 for at, _ in spans)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))   # no overlap
    assert spans[-1][1] <= nbytes < spans[-1][1] + 16
    assert max(offsets.values()) == offsets["block_tables"]   # last: the kernel copies only its columns in use
    assert offsets["header"] == 0 and idle["header"].nbytes >= 24


def test_fill_writes_the_plan_then_padding_over_a_wider_plan():
    arrays, idle = staging_views()
    wide = [decoding(f"w{i}", 19, i) for i in range(5)]   # 20 tokens: 5 blocks of the table
    assert _fill(arrays, idle, build_step_plan(0, [(r, 1) for r in wide], [[i + 1] * 5 for i in range(5)], [],
                                               BLOCK)) is False
    a, b = decoding("a", 3, 11), decoding("b", 6, 12)      # 4 and 7 tokens: 1 and 2 blocks
    # b's token is the one the plan in flight samples at its row 1 (decode ahead): pending
    plan = build_step_plan(1, [(a, 1), (b, 1)], [[9], [3, 4]], [], BLOCK, ahead={"b": (0, 1)})
    assert arrays["header"][2] == 5
    assert _fill(arrays, idle, plan) is True
    # two columns in use: the device copies those alone, so the wider plan's others may stay
    assert arrays["header"][2] == 2
    np.testing.assert_array_equal(arrays["block_tables"][:2, :2], [[9, 0], [3, 4]])
    np.testing.assert_array_equal(arrays["block_tables"][2:, :2], 0)
    for name in ("token_ids", "token_sources", "positions", "slot_mapping", "seq_lens"):
        np.testing.assert_array_equal(arrays[name][:2], getattr(plan, name), err_msg=name)
        np.testing.assert_array_equal(arrays[name][2:], idle[name][2:], err_msg=name)
    np.testing.assert_array_equal(arrays["positions"][:2], [3, 6])
    np.testing.assert_array_equal(arrays["slot_mapping"][:2], [9 * BLOCK + 3, 4 * BLOCK + 2])
    np.testing.assert_array_equal(arrays["top_k"][:3], [5, 5, 0])
    np.testing.assert_array_equal(arrays["seeds"][:3], [11, 12, 0])
    np.testing.assert_array_equal(arrays["slot_mapping"][2:], -1)   # padding rows write no KV
    np.testing.assert_array_equal(arrays["token_sources"][:3], [-1, 1, -1])   # b's from row 1, then padding


def _device_tokens(ptr: int, dtype=np.int32) -> SimpleNamespace:
    """What _stage reads of a device array: its dtype, layout and address."""
    return SimpleNamespace(dtype=np.dtype(dtype), flags=SimpleNamespace(c_contiguous=True),
                           data=SimpleNamespace(ptr=ptr))


class _Reader:
    def __init__(self):
        self.settled = 0

    def settle(self):
        self.settled += 1


def test_stage_fills_the_slots_in_turn():
    """Steps fill the two slots in turn (each slot's own graph reads it), with the previous
    step's tokens' address where tokens are pending (else 0); the step that read a slot last has
    its tokens taken before the slot is filled again."""
    idle = _idle_inputs(SIZE, MAX_BLOCKS)
    offsets, nbytes = packed_layout(idle)
    slots = tuple(_Staging(raw, views(raw, offsets, idle), np.zeros(SIZE, np.int32))
                  for raw in (np.zeros(nbytes, np.uint8), np.zeros(nbytes, np.uint8)))
    bucket = _Bucket(SIZE, None, {}, offsets, slots, idle)
    stage = DecodeGraphs.__new__(DecodeGraphs)._stage
    a, b = decoding("a", 3, 11), decoding("b", 6, 12)
    known = build_step_plan(0, [(a, 1), (b, 1)], [[9], [3, 4]], [], BLOCK)
    ahead = build_step_plan(1, [(a, 1), (b, 1)], [[9], [3, 4]], [], BLOCK, ahead={"b": (0, 1)})
    slots[1].arrays["header"][0] = 0xDEAD
    assert stage(bucket, known, None) == 0
    assert slots[0].arrays["header"][0] == 0 and slots[1].arrays["header"][0] == 0xDEAD   # the other slot untouched
    slots[0].reader = reader = _Reader()
    assert stage(bucket, ahead, SimpleNamespace(tokens=_device_tokens(0xABC0))) == 1
    assert slots[1].arrays["header"][0] == 0xABC0
    np.testing.assert_array_equal(slots[1].arrays["token_sources"][:3], [-1, 1, -1])
    assert reader.settled == 0
    assert stage(bucket, known, None) == 0
    assert reader.settled == 1 and slots[0].arrays["header"][0] == 0
    with pytest.raises(ValueError, match="pending tokens but no step"):
        stage(bucket, ahead, None)
    with pytest.raises(ValueError, match="contiguous int32"):
        stage(bucket, ahead, SimpleNamespace(tokens=_device_tokens(0xABC0, np.int64)))


class _Event:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def synchronize(self):
        self.log.append(("wait", self.name))


class _Stream:
    def __init__(self, log: list):
        self.log, self.count = log, 0

    def record(self):
        self.count += 1
        return _Event(self.log, f"copy{self.count}")


class _Device:
    def __init__(self, log: list):
        self.log = log

    def set(self, host, stream):
        self.log.append(("copy", bytes(host), stream))


def test_copy_turns_wait_for_the_copy_out_of_the_buffer_they_hand_out():
    """Buffers alternate; a buffer is handed out again only after the copy out of it two turns
    ago is waited for (never the other buffer's newer copy), and each copy goes on the stream."""
    log: list = []
    turns, stream, device = CopyTurns(), _Stream(log), _Device(log)
    buffers = [np.zeros(4, np.uint8), np.zeros(4, np.uint8)]
    for step in range(5):
        slot = turns.next()
        assert slot == step % 2
        buffers[slot][:] = step
        turns.copy(slot, buffers[slot], device, stream)
    assert log == [("copy", bytes([0] * 4), stream), ("copy", bytes([1] * 4), stream),
                   ("wait", "copy1"), ("copy", bytes([2] * 4), stream),
                   ("wait", "copy2"), ("copy", bytes([3] * 4), stream),
                   ("wait", "copy3"), ("copy", bytes([4] * 4), stream)]


def test_graph_buckets_end_at_max_batch_once():
    assert graph_buckets(1) == (1,)
    assert graph_buckets(24) == (1, 2, 4, 8, 16, 24)
    assert graph_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert graph_buckets(512) == graph_buckets(4096) == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
