"""A captured decode step's own input and output traffic, on a GPU: stage_decode_inputs (the
graph's first kernel reads its pinned host slot, the pending token ids from the previous
step's tokens on the device) against the bytes the host wrote, and the sampling
kernel's tokens written into pinned host memory too (`publish`). Random slot contents, fresh
each run; skipped without CuPy or a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpu_guard import cupy  # noqa: E402  (skips the module without a GPU)

import cupyx  # noqa: E402
from shardline.kernels.staging import packed_layout  # noqa: E402
from shardline.worker.cuda_graphs import _idle_inputs  # noqa: E402
from test_kernels_gpu import ops, rng  # noqa: E402, F401  (fixtures)

pytestmark = pytest.mark.gpu


def random_slot(rng, nbytes: int, previous: int) -> np.ndarray:
    slot = cupyx.empty_pinned(nbytes, np.uint8)
    slot[:] = rng.integers(0, 256, nbytes, dtype=np.uint8)
    slot[:8].view(np.int64)[0] = previous
    return slot


def stage(ops, slot, dst, offsets, rows, width):
    ops.stage_decode_inputs(slot, dst, offsets["token_ids"], offsets["token_sources"], rows, offsets["block_tables"],
                            width)


def expected_dst(before: np.ndarray, slot: np.ndarray, offsets: dict, rows: int, width: int,
                 columns: int) -> np.ndarray:
    """What the kernel leaves in a device buffer holding `before`: the slot's bytes before the
    tables (the token ids as the slot has them: the caller sets the pending ones), and of the
    tables only the first `columns` columns, to the next multiple of 4 (0 or more than the
    width: all); everything else as it was."""
    want = before.copy()
    table_at = offsets["block_tables"]
    want[:table_at] = slot[:table_at]
    copied = width if columns < 1 or columns > width else -(-columns // 4) * 4
    tables = slice(table_at, table_at + 4 * rows * width)
    want_tables = want[tables].view(np.int32).reshape(rows, width)
    want_tables[:, :copied] = slot[tables].view(np.int32).reshape(rows, width)[:, :copied]
    return want


# 512 rows of 256 blocks: 8 blocks of the kernel, each over its units four times
@pytest.mark.parametrize("rows, max_blocks, columns", [(1, 7, 7), (5, 7, 3), (64, 13, 1), (64, 13, 5), (64, 9, 0),
                                                       (3, 5, 99), (512, 256, 33), (512, 256, 256)])
def test_stage_decode_inputs_copies_the_slot_with_the_pending_tokens(ops, rng, rows, max_blocks, columns):
    """The slot's bytes, the pending tokens from the previous step's, and the tables' columns in
    use (header word 2); nothing written past the buffer."""
    idle = _idle_inputs(rows, max_blocks)
    offsets, nbytes = packed_layout(idle)
    width = idle["block_tables"].shape[1]
    assert width % 4 == 0 and width >= max_blocks
    tokens_at, sources_at = offsets["token_ids"], offsets["token_sources"]
    previous = cupy.asarray(rng.integers(0, 50000, 3 * rows + 1, dtype=np.int32))
    slot = random_slot(rng, nbytes, previous.data.ptr)
    slot[16:24].view(np.int64)[0] = columns
    sources = np.where(rng.random(rows) < 0.5, rng.integers(0, previous.size, rows), -1).astype(np.int32)
    sources[0] = previous.size - 1   # at least one pending token, and the last of the previous step's
    slot[sources_at:sources_at + 4 * rows].view(np.int32)[:] = sources
    before = rng.integers(0, 256, nbytes + 4096, dtype=np.uint8)   # the buffer, then 4 KB that must stay
    whole = cupy.asarray(before)
    dst = whole[:nbytes]
    stage(ops, slot, dst, offsets, rows, width)
    got = cupy.asnumpy(whole)
    want = np.r_[expected_dst(before[:nbytes], np.array(slot), offsets, rows, width, columns), before[nbytes:]]
    units = np.r_[tokens_at:sources_at]   # the token ids' 16-byte units (their padding is not copied)
    np.testing.assert_array_equal(np.delete(got, units), np.delete(want, units))
    token_span = slice(tokens_at, tokens_at + 8 * rows)
    expected = want[token_span].view(np.int64).copy()
    pending = sources >= 0
    expected[pending] = cupy.asnumpy(previous)[sources[pending]]
    np.testing.assert_array_equal(got[token_span].view(np.int64), expected)
    rest = offsets["positions"]   # the arrays after the token ids and sources, rewritten: read again, not cached
    slot[rest:] = rng.integers(0, 256, nbytes - rest, dtype=np.uint8)
    slot[16:24].view(np.int64)[0] = width   # all columns this time
    stage(ops, slot, dst, offsets, rows, width)
    table_end = offsets["block_tables"] + 4 * rows * width
    np.testing.assert_array_equal(cupy.asnumpy(dst)[rest:table_end], np.array(slot)[rest:table_end])


def test_stage_decode_inputs_rejects_misaligned_or_unequal_buffers(ops):
    with pytest.raises(ValueError, match="16-byte aligned and equal sizes"):
        ops.stage_decode_inputs(cupyx.empty_pinned(48, np.uint8), cupy.zeros(64, np.uint8), 16, 32, 1, 48, 4)
    with pytest.raises(ValueError, match="token ids at 8"):
        ops.stage_decode_inputs(cupyx.empty_pinned(64, np.uint8), cupy.zeros(64, np.uint8), 8, 32, 1, 48, 4)
    with pytest.raises(ValueError, match="of 6 columns: 16-byte aligned"):
        ops.stage_decode_inputs(cupyx.empty_pinned(96, np.uint8), cupy.zeros(96, np.uint8), 32, 48, 1, 64, 6)
    with pytest.raises(ValueError, match="must come before the tables at 32"):
        ops.stage_decode_inputs(cupyx.empty_pinned(96, np.uint8), cupy.zeros(96, np.uint8), 32, 48, 2, 32, 4)
    with pytest.raises(ValueError, match="2 x 12 tables end the 96 bytes"):
        ops.stage_decode_inputs(cupyx.empty_pinned(96, np.uint8), cupy.zeros(96, np.uint8), 32, 48, 2, 64, 12)


@pytest.mark.parametrize("batch", [1, 33])
def test_sample_publishes_its_tokens_to_pinned_memory(ops, rng, batch):
    vocab = 32000
    logits = cupy.asarray(rng.standard_normal((batch, vocab)).astype(np.float32))
    params = (np.zeros(batch, np.float32), np.zeros(batch, np.int32), np.ones(batch, np.float32),
              np.zeros(batch, np.uint64), np.zeros(batch, np.int64))
    host = cupyx.empty_pinned(batch, np.int32)
    host[:] = -7
    off = ops.sample(logits, *params, publish=cupy.zeros(1, np.int64))   # address 0: the host is left alone
    cupy.cuda.get_current_stream().synchronize()
    np.testing.assert_array_equal(host, -7)
    tokens = ops.sample(logits, *params, publish=cupy.asarray([host.ctypes.data], np.int64))
    cupy.cuda.get_current_stream().synchronize()
    want = np.argmax(cupy.asnumpy(logits), axis=-1)
    np.testing.assert_array_equal(cupy.asnumpy(tokens), want)
    np.testing.assert_array_equal(cupy.asnumpy(off), want)
    np.testing.assert_array_equal(host, want)
