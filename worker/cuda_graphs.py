"""Decode steps replayed from CUDA graphs: per batch-size bucket, a graph for each of its two
staging slots.

A pure decode plan (every request one new token, all of them sampling, no
block copies, penalties or log-probabilities) on a single-rank CUDA engine
runs as: the plan's arrays written into the bucket's next pinned host staging
slot (the two are used in turn; padded rows write no KV: slot -1), and one
launch of that slot's graph. The graph does the rest: its first kernel reads
its slot into the bucket's static device buffers, taking the pending tokens
of a step decoded ahead from the previous step's samples; then the
embedding, every layer, final norm, LM head, and sampling, which writes the
tokens into the slot's pinned host memory too. So no copy engine works, and
no kernel waits on one, between two replays; and since a slot's address is
its graph's own, a replay reads the slot filled for it however late it
starts. Every bucket's graphs are captured when the engine
starts (capture_all, largest first), or else the first time a plan of its
size comes: for each slot one eager warm-up on the padded buffers (nothing is
written to the cache), then its capture, all drawing from a memory pool of
the graphs' own so the intermediates keep their addresses for replays (the
graphs share its blocks: they replay one at a time, on one stream).
cuBLAS runs through nvmath on a handle with its own workspace, which is
capturable (cupy's own matmul is not).

If a capture fails (an op that syncs or copies from the host), graphs are
switched off for the engine with a warning and every plan runs eagerly.
Must not schedule or decide what is graphable beyond the plan's shape.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shardline.kernels.staging import CopyTurns, packed_layout, views
from shardline.worker.model_runner import SAMPLING_INPUTS, Launched, PagedAttentionContext
from shardline.worker.step_plan import StepPlan

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def graph_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes graphs are captured for: BUCKETS below max_batch, then max_batch itself
    (at most the last of BUCKETS; larger decode steps run eagerly)."""
    return tuple(sorted({b for b in BUCKETS if b < max_batch} | {min(max_batch, BUCKETS[-1])}))


def is_pure_decode(plan: StepPlan) -> bool:
    num_requests, s = len(plan.request_ids), plan.sampling
    return (plan.num_tokens == num_requests == plan.sample_rows.size and not plan.block_copies.size
            and not s.prompt_ids.shape[1] and not s.output_ids.shape[1] and not s.num_logprobs.any()
            and np.array_equal(plan.sample_rows, np.arange(num_requests)))


@dataclass
class _Staging:
    """Pinned host arrays laid out as a bucket's device buffer, which the graph's first kernel
    reads; and the pinned memory the graph's sampling writes the tokens into."""

    raw: np.ndarray                   # [nbytes] uint8, pinned
    arrays: dict[str, np.ndarray]     # name -> view into raw
    tokens: np.ndarray                # [size] int32, pinned
    reader: Launched | None = None    # the step that read this slot last


@dataclass
class _Bucket:
    """Static device buffers of one batch size (views into one allocation); the captured
    graphs read and write only these."""

    size: int
    raw: Any                          # [nbytes] uint8 on the device
    arrays: dict[str, Any]            # name -> device array, [size] (block_tables [size, max_blocks])
    offsets: dict[str, int]           # name -> byte offset in raw (and in each slot)
    staging: tuple[_Staging, _Staging]   # used in turn: one may still be read while the next is filled
    idle: dict[str, np.ndarray]       # the padding's values
    turns: CopyTurns = field(default_factory=CopyTurns)
    graphs: list = field(default_factory=lambda: [None, None])   # a slot's graph reads that slot
    tokens: list = field(default_factory=lambda: [None, None])   # [size] int32 on the device, their outputs


class DecodeGraphs:
    def __init__(self, runner: Any, max_batch: int, max_blocks_per_seq: int):
        import cupy
        self.runner, self.max_blocks_per_seq = runner, max_blocks_per_seq
        self.buckets = graph_buckets(max_batch)
        self._cupy = cupy
        self._pool = cupy.cuda.MemoryPool()
        self._stream = cupy.cuda.Stream()   # blocking: ordered with the eager steps on the default stream
        self._captured: dict[int, _Bucket] = {}
        self.disabled: str | None = None
        self.num_replays = 0

    def close(self) -> None:
        """Drops every captured graph. Before a tensor-parallel communicator goes: NCCL
        (2.26 on) will not destroy a communicator while a graph holding its work lives, and
        the runner <-> graphs cycle leaves their order to Python's collector otherwise."""
        self._stream.synchronize()
        self._captured.clear()
        self._pool.free_all_blocks()

    def capture_all(self) -> None:
        """Captures every bucket's graphs now, largest first (the smaller ones then take their
        buffers from the blocks the larger left in the pool), so that no step waits on a
        capture, nor on the GEMM tuning of its warm-up; stops where one fails (graphs off)."""
        for size in reversed(self.buckets):
            if size not in self._captured and self._capture(size) is None:
                return

    def accepts(self, plan: StepPlan) -> bool:
        return (self.disabled is None and len(plan.request_ids) <= self.buckets[-1]
                and plan.block_tables.shape[1] <= self.max_blocks_per_seq and is_pure_decode(plan))

    def launch(self, plan: StepPlan, previous: Launched | None = None, defer: bool = False) -> Launched | None:
        """The plan's tokens from a graph replay (with `defer`: on their way to the host);
        None when graphs are (now) off. Pending tokens (decode ahead) are taken from
        `previous`'s tokens on the device by the graph's first kernel. A replay's tokens on the
        device (Launched.tokens) hold only until the next replay is past its first kernel: they
        may sit in pool blocks another graph uses as scratch. The next step reads them there."""
        size = next(b for b in self.buckets if b >= len(plan.request_ids))
        if size not in self._captured:
            self._stream.synchronize()   # capture with nothing of an earlier step still queued
        bucket = self._captured.get(size) or self._capture(size)
        if bucket is None:
            return None
        slot = self._stage(bucket, plan, previous)
        bucket.graphs[slot].launch(stream=self._stream)
        self.num_replays += 1
        n, staging = len(plan.request_ids), bucket.staging[slot]
        staging.reader = Launched(bucket.tokens[slot][:n], staging.tokens[:n], bucket.turns.read(slot, self._stream))
        if not defer:
            staging.reader.settle()
        return staging.reader

    def _stage(self, bucket: _Bucket, plan: StepPlan, previous: Launched | None) -> int:
        """The plan's inputs into the bucket's next staging slot (returned), once the replay
        that read it two turns ago is done and its tokens are taken from there."""
        slot = bucket.turns.next()
        staging = bucket.staging[slot]
        if staging.reader is not None:
            staging.reader.settle()
        if _fill(staging.arrays, bucket.idle, plan):
            if previous is None:
                raise ValueError(f"plan {plan.step_id}: pending tokens but no step launched before it")
            if previous.tokens.dtype != np.int32 or not previous.tokens.flags.c_contiguous:
                raise ValueError(f"plan {plan.step_id}: the previous step's tokens must be contiguous int32, "
                                 f"got {previous.tokens.dtype}")
            staging.arrays["header"][0] = previous.tokens.data.ptr
        else:
            staging.arrays["header"][0] = 0
        return slot

    def _capture(self, size: int) -> _Bucket | None:
        cupy = self._cupy
        bucket = self._new_bucket(size)
        try:
            # Our kernels go in as dependent launches, each allowed to start while the one before
            # finishes (the warm-up runs them so too, so a launch error shows before the capture).
            with cupy.cuda.using_allocator(self._pool.malloc), self._stream, \
                    self.runner.backend.ops.dependent_launches():
                for slot in (0, 1):
                    self._forward(bucket, slot)   # warm-up: the pool then holds every block the capture needs
                    self._stream.begin_capture()
                    try:
                        bucket.tokens[slot] = self._forward(bucket, slot)
                    finally:
                        bucket.graphs[slot] = self._stream.end_capture()
            self._stream.synchronize()
        except Exception as err:   # an op that cannot be captured: run eagerly from now on
            self._captured.clear()
            self._pool.free_all_blocks()   # the eager steps may need that memory
            self.disabled = f"{type(err).__name__}: {err}"
            log.warning("CUDA graph capture of batch %d failed, decoding eagerly: %s", size, self.disabled)
            return None
        self._captured[size] = bucket
        return bucket

    def _new_bucket(self, size: int) -> _Bucket:
        import cupyx
        idle = _idle_inputs(size, self.max_blocks_per_seq)
        offsets, nbytes = packed_layout(idle)
        raw = self._cupy.zeros(nbytes, np.uint8)
        staging = []
        for _ in range(2):
            host, tokens = cupyx.empty_pinned(nbytes, np.uint8), cupyx.empty_pinned(size, np.int32)
            arrays = views(host, offsets, idle)
            for name, value in idle.items():
                arrays[name][...] = value
            arrays["header"][1] = tokens.ctypes.data   # where the sampling writes the tokens (UVA: as on the host)
            staging.append(_Staging(host, arrays, tokens))
        return _Bucket(size, raw, views(raw, offsets, idle), offsets, tuple(staging), idle)

    def _forward(self, bucket: _Bucket, slot: int):
        """Tokens [size] int32 of one decode step: staging `slot` into the bucket's buffers,
        then the step over them."""
        a, runner, ops = bucket.arrays, self.runner, self.runner.backend.ops
        ops.stage_decode_inputs(bucket.staging[slot].raw, bucket.raw, bucket.offsets["token_ids"],
                                bucket.offsets["token_sources"], bucket.size, bucket.offsets["block_tables"],
                                a["block_tables"].shape[1])
        ctx = PagedAttentionContext(runner.backend, runner.config, runner.kv, a["slot_mapping"], a["block_tables"],
                                    a["seq_lens"], a["query_start_loc"], one_query_each=True)   # 0, 1, ..., size
        hidden = runner.model.forward(a["token_ids"], a["positions"], ctx)
        logits = runner.model.compute_logits(hidden)
        *args, min_p = (a[name] for name in SAMPLING_INPUTS)
        return ops.sample(logits, *args, min_p=min_p, publish=a["header"][1:2])


def _fill(arrays: dict[str, np.ndarray], idle: dict[str, np.ndarray], plan: StepPlan) -> bool:
    """The plan's decode inputs into a bucket's staging `arrays`: its rows first, padding
    (`idle`'s values) after them; token_sources holds each pending token's row in the previous
    step's samples (-1: the token id is known). Returns whether any token is pending."""
    n, width = len(plan.request_ids), max(1, plan.block_tables.shape[1])
    for name in _PLAN_INPUTS:
        arrays[name][:n] = getattr(plan, name)
    for name in SAMPLING_INPUTS:
        arrays[name][:n] = getattr(plan.sampling, name)
    for name in _PLAN_INPUTS + SAMPLING_INPUTS:
        arrays[name][n:] = idle[name][n:]
    # Only the table's first `width` columns go to the device (header word 2); the rest of its
    # rows there keep what earlier steps left, past every row's blocks, so never read.
    tables, used = arrays["block_tables"], plan.block_tables.shape[1]
    arrays["header"][2] = width
    tables[:n, :used] = plan.block_tables
    tables[:n, used:width] = 0
    tables[n:, :width] = idle["block_tables"][n:, :width]
    return bool(arrays["token_sources"][:n].max(initial=-1) >= 0)


_PLAN_INPUTS = ("token_ids", "token_sources", "positions", "slot_mapping", "seq_lens")


def _idle_inputs(size: int, max_blocks: int) -> dict[str, np.ndarray]:
    """A bucket's decode inputs, all padding: a padding row is a one-token sequence over
    block 0 whose K/V go nowhere (slot -1). First a header: the previous step's tokens on the
    device (stage_decode_inputs_kernel reads the pending ones there), the host address the
    sampling writes the tokens to, and the block-table columns the step uses (0: all). The
    block tables come last, rows widened to whole 16-byte units: the kernel copies only those
    columns of them. Token ids are the embedding's int64."""
    return {
        "header": np.zeros(3, np.int64),
        "token_ids": np.zeros(size, np.int64), "token_sources": np.full(size, -1, np.int32),
        "positions": np.zeros(size, np.int64),
        "slot_mapping": np.full(size, -1, np.int64), "seq_lens": np.ones(size, np.int32),
        "query_start_loc": np.arange(size + 1, dtype=np.int32),
        "temperature": np.zeros(size, np.float32), "top_k": np.zeros(size, np.int32),
        "top_p": np.ones(size, np.float32), "min_p": np.zeros(size, np.float32),
        "seeds": np.zeros(size, np.uint64), "offsets": np.zeros(size, np.int64),
        "block_tables": np.zeros((size, -(-max_blocks // 4) * 4), np.int32),   # rows of 16-byte units
    }
