"""The GPU fast paths of CudaOps against the NumPy float64 reference: the
tensor-core flash attention over the paged cache (prefill chunks, decode
rows, padding, windows, GQA packing, key splits), the skinny decode GEMM (plain
and with the SiLU gate fused) and dependent launches.
Same fixtures as test_kernels_gpu.py (fresh seeds, NaN-poisoned allocations);
skipped without CuPy or a GPU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from gpu_guard import cupy  # noqa: F401, E402  (skips the module without a GPU)

from shardline.kernels import numpy_ops  # noqa: E402
from shardline.kernels.cuda_common import (  # noqa: E402
    _FLASH_SM90_HEAD_DIMS,
    _ctype,
    _skinny_tiles,
    flash_decode_template,
)
from shardline.kernels.cuda_skinny import skinny_large_bytes_for  # noqa: E402
from test_kernels_gpu import (  # noqa: E402, F401  (fixtures: ops, rng, poisoned_allocations)
    assert_close,
    ops,
    poisoned_allocations,
    random_block_tables,
    random_input,
    random_paged,
    rng,
)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("tokens,k,n", [(1, 4096, 6144), (2, 576, 37), (3, 8, 1), (4, 14336, 4096), (1, 72, 129)])
def test_skinny_gemm(ops, rng, dtype, tokens, k, n, monkeypatch):
    """Decode-sized GEMMs run skinny_gemm.cu (not cuBLAS): odd feature counts, the shortest
    K, a bias added through `accumulate`, K split over 1, 2 and 4 warps."""
    monkeypatch.setattr(ops, "use_skinny_gemm", True)
    x, x64 = random_input(ops, rng, (tokens, k), dtype)
    w, w64 = random_input(ops, rng, (n, k), dtype, scale=1 / math.sqrt(k))
    b, b64 = random_input(ops, rng, (n,), dtype)
    for k_split in (1, 2, 4):
        monkeypatch.setattr(ops, "skinny_k_split", k_split)
        assert ops._skinny_applies(x, w)
        assert_close(ops, ops.linear(x, w), numpy_ops.linear(x64, w64), dtype, f"skinny, K in {k_split}")
        assert_close(ops, ops.linear(x, w, b), numpy_ops.linear(x64, w64, b64), dtype, f"skinny+bias, K in {k_split}")


def test_skinny_max_rows(ops, rng, monkeypatch):
    """GEMMs of more rows than skinny_max_rows (weights of skinny_large_bytes or more:
    skinny_large_max_rows) go to cuBLAS with the same result; a cap past the rows the kernels
    are built for is a clear error; an H200 caps weights of 16 MiB or more at 2 rows."""
    monkeypatch.setattr(ops, "use_skinny_gemm", True)
    monkeypatch.setattr(ops, "skinny_large_max_rows", 2)
    x, x64 = random_input(ops, rng, (3, 1024), "bfloat16")
    w, w64 = random_input(ops, rng, (300, 1024), "bfloat16", scale=1 / 32)
    for cap, large, skinny in ((4, None, True), (3, None, True), (2, None, False), (0, None, False),
                               (4, w.nbytes, False), (4, w.nbytes + 1, True)):
        monkeypatch.setattr(ops, "skinny_max_rows", cap)
        monkeypatch.setattr(ops, "skinny_large_bytes", large)
        assert ops._skinny_applies(x, w) is skinny, (cap, large)
        assert_close(ops, ops.linear(x, w), numpy_ops.linear(x64, w64), "bfloat16", f"3 rows, cap {cap}, {large}")
    for bad in (5, -1, None):
        with pytest.raises(ValueError, match="skinny_max_rows"):
            ops.skinny_max_rows = bad
    assert ops.skinny_max_rows == 4   # the last cap set stays
    assert (skinny_large_bytes_for("NVIDIA H200"), skinny_large_bytes_for("NVIDIA H100 80GB HBM3")) == (16 << 20, None)


def test_skinny_k_split_timed_per_shape(ops, rng, monkeypatch):
    """Without a pinned split, a shape's K split is timed the first time it comes outside a
    capture and kept; during a capture a new shape runs at 1 and is timed later; a pinned
    split that was never compiled is a clear error."""
    monkeypatch.setattr(ops, "use_skinny_gemm", True)
    monkeypatch.setattr(ops, "skinny_k_split", None)
    monkeypatch.setattr(ops, "_skinny_splits", {})
    x, x64 = random_input(ops, rng, (1, 1024), "bfloat16")
    w, w64 = random_input(ops, rng, (3000, 1024), "bfloat16", scale=1 / 32)
    assert_close(ops, ops.linear(x, w), numpy_ops.linear(x64, w64), "bfloat16", "skinny, timed split")
    assert list(ops._skinny_splits.values()) in ([1], [2], [4])
    stream = cupy.cuda.Stream(non_blocking=True)
    other, _ = random_input(ops, rng, (500, 1024), "bfloat16")
    with stream:
        stream.begin_capture()
        try:
            assert ops._skinny_k_split(x, other, False) == 1
        finally:
            stream.end_capture()
    assert len(ops._skinny_splits) == 1
    monkeypatch.setattr(ops, "skinny_k_split", 3)
    with pytest.raises(ValueError, match="skinny_k_split"):
        ops.linear(x, w)


@pytest.mark.parametrize("tokens,k,n,gated", [(1, 4096, 6144, False), (4, 1024, 3000, False), (2, 576, 37, False),
                                              (3, 512, 2 * 4099, True), (1, 2048, 1000, True),
                                              # one row (tiles loaded ahead): a ragged last tile, a gated
                                              # GEMM looping at K split 1, K past the prefetched steps
                                              (1, 4096, 6143, False), (1, 2048, 2 * 2000, True),
                                              (1, 1320, 3000, False)])
def test_skinny_looped_kernels_are_the_one_block_a_tile_launch_bitwise(ops, rng, tokens, k, n, gated, monkeypatch):
    """skinny_blocks_per_sm: at most that many blocks an SM, and no more than fit one (the
    driver's count), each looping over tiles (the *_looped kernels; at one row each tile's
    first weights loaded while the one before ends), give the bits of a block a tile at every
    K split (the K merge's two buffers alternate between a block's tiles), with dependent
    launches; a launch of no more tiles than that keeps the plain kernel. Below
    skinny_looped_min_rows rows the few rows' setting applies, uncapped (more blocks than fit,
    as an H200 runs one row), with the same bits. With a bias (added onto the output), a tile
    run twice would add it twice."""
    monkeypatch.setattr(ops, "use_skinny_gemm", True)
    monkeypatch.setattr(ops, "skinny_looped_min_rows", 1)
    x, x64 = random_input(ops, rng, (tokens, k), "bfloat16")
    w, w64 = random_input(ops, rng, (n, k), "bfloat16", scale=1 / math.sqrt(k))
    b, b64 = random_input(ops, rng, (n,), "bfloat16")
    want = numpy_ops.gated_linear(x64, w64) if gated else numpy_ops.linear(x64, w64, b64)
    num_out = n // 2 if gated else n
    sms, looped = ops._multiprocessors, 0
    for k_split in (1, 2, 4):
        monkeypatch.setattr(ops, "skinny_k_split", k_split)
        template = f"__nv_bfloat16, {tokens}, {k_split}"
        fits = ops._resident_blocks("skinny_gemm_looped_kernel", template)
        assert 1 <= fits <= 2048 // 128   # an SM's threads
        outs, few_outs = {}, {}
        for per_sm in (0, 1, 3, 16):   # 16: more than fit an SM (capped there, not in the few rows' setting)
            monkeypatch.setattr(ops, "skinny_blocks_per_sm", per_sm)
            kernel, grid = ops._skinny_grid("skinny_gemm_kernel", template, num_out, gated, k_split, tokens)
            tiles, blocks = _skinny_tiles(num_out, gated, k_split), min(per_sm, fits) * sms
            loops = 0 < blocks < tiles
            assert (kernel, grid) == (("skinny_gemm_looped_kernel", (blocks,)) if loops
                                      else ("skinny_gemm_kernel", (tiles,)))
            looped += loops
            with ops.dependent_launches():   # as in captured graphs
                outs[per_sm] = ops.gated_linear(x, w) if gated else ops.linear(x, w, b)
            monkeypatch.setattr(ops, "skinny_looped_min_rows", tokens + 1)   # below it: the few rows' setting
            monkeypatch.setattr(ops, "skinny_blocks_per_sm_few_rows", 0)
            assert ops._skinny_grid("skinny_gemm_kernel", template, num_out, gated, k_split, tokens)[0] == \
                "skinny_gemm_kernel"
            monkeypatch.setattr(ops, "skinny_blocks_per_sm_few_rows", per_sm)
            monkeypatch.setattr(ops, "skinny_blocks_per_sm", 0)
            few = ops._skinny_grid("skinny_gemm_kernel", template, num_out, gated, k_split, tokens)
            assert few == (("skinny_gemm_looped_kernel", (per_sm * sms,)) if 0 < per_sm * sms < tiles
                           else ("skinny_gemm_kernel", (tiles,)))
            with ops.dependent_launches():
                few_outs[per_sm] = ops.gated_linear(x, w) if gated else ops.linear(x, w, b)
            monkeypatch.setattr(ops, "skinny_blocks_per_sm", per_sm)
            monkeypatch.setattr(ops, "skinny_looped_min_rows", 1)
        for per_sm in (1, 3, 16):
            np.testing.assert_array_equal(ops.to_host(outs[per_sm]), ops.to_host(outs[0]),
                                          err_msg=f"{per_sm} blocks an SM, K in {k_split}")
            np.testing.assert_array_equal(ops.to_host(few_outs[per_sm]), ops.to_host(outs[0]),
                                          err_msg=f"{per_sm} blocks an SM uncapped, K in {k_split}")
        assert_close(ops, outs[1], want, "bfloat16", f"looped skinny GEMM, K in {k_split}")
    assert looped or n * k < 10 ** 6   # the small shapes keep a block a tile on any GPU


def test_shared_carveout_reaches_every_kernel_and_changes_no_result(ops, rng, monkeypatch):
    """CudaOps.shared_carveout sets every kernel's preferred shared-memory share and None
    gives the choice back to the driver; results are the same bits either way; a share
    outside 0-100 is refused."""
    monkeypatch.setattr(ops, "use_skinny_gemm", True)
    x, _ = random_input(ops, rng, (1, 4096), "bfloat16")
    w, _ = random_input(ops, rng, (1000, 4096), "bfloat16", scale=1 / 64)
    before = ops.to_host(ops.linear(x, w))
    try:
        ops.shared_carveout = 50
        assert all(f.preferred_shared_memory_carveout == 50 for f in ops._functions.values())
        np.testing.assert_array_equal(ops.to_host(ops.linear(x, w)), before)
    finally:
        ops.shared_carveout = None
    assert ops.shared_carveout is None
    np.testing.assert_array_equal(ops.to_host(ops.linear(x, w)), before)
    with pytest.raises(ValueError, match="shared_carveout"):
        ops.shared_carveout = 150


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("tokens,k,inter", [(1, 4096, 14336), (2, 576, 1536), (4, 64, 3)])
def test_skinny_gated_linear(ops, rng, dtype, tokens, k, inter, monkeypatch):
    """The gate fused into the skinny GEMM: against float64, and equal to the two unfused
    ops (the same roundings) value for value, K split over 1, 2 and 4 warps."""
    monkeypatch.setattr(ops, "use_skinny_gemm", True)
    x, x64 = random_input(ops, rng, (tokens, k), dtype)
    w, w64 = random_input(ops, rng, (2 * inter, k), dtype, scale=2 / math.sqrt(k))
    for k_split in (1, 2, 4):
        monkeypatch.setattr(ops, "skinny_k_split", k_split)
        fused = ops.gated_linear(x, w)
        assert fused.shape == (tokens, inter)
        assert_close(ops, fused, numpy_ops.gated_linear(x64, w64), dtype, f"gated skinny, K in {k_split}")
        np.testing.assert_array_equal(ops.to_host(fused), ops.to_host(ops.silu_and_mul(ops.linear(x, w))))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("head_dim,block_size,window", [(64, 16, None), (128, 16, None), (80, 5, None),
                                                        (64, 16, 37), (128, 1, 100)])
@pytest.mark.parametrize("rows_per_warp,heads_first", [(16, True), (32, True), (16, False), (32, False),
                                                      ("sm90", True), ("sm90", False)])
def test_paged_flash_prefill(ops, rng, dtype, head_dim, block_size, window, rows_per_warp, heads_first,
                             monkeypatch):
    """The tensor-core prefill kernel (chunks of long prefills, one decode row and an
    idle sequence in the launch, one padding row) against the float64 reference: 16 rows a
    warp (flash_attention_kernel), 32 (flash_prefill_kernel, two m-tiles) or, on sm_90, the
    warpgroup-mma kernel (flash_prefill_sm90_kernel; head sizes 64 and 128, others the 16-row one)."""
    sm90 = rows_per_warp == "sm90"
    if sm90 and str(cupy.cuda.Device().compute_capability) != "90":
        pytest.skip("flash_prefill_sm90.cu is built for sm_90a alone")
    monkeypatch.setattr(ops, "use_flash", True)   # even where SHARDLINE_GPU_OFF names it
    monkeypatch.setattr(ops, "prefill_sm90", sm90)
    monkeypatch.setattr(ops, "prefill_rows_per_warp", 16 if sm90 else rows_per_warp)
    monkeypatch.setattr(ops, "prefill_heads_first", heads_first)
    launched, launch = [], ops._launch
    monkeypatch.setattr(ops, "_launch", lambda name, *args, **kw: (launched.append(name), launch(name, *args, **kw))[1])
    heads, kv_heads = 8, 2
    seq_lens = np.array([300, 64, 130, 90, 12], dtype=np.int32)
    new_tokens = np.array([130, 64, 1, 77, 0], dtype=np.int32)
    tables, k_cache, k64, v_cache, v64, qsl, q, q64, num_tokens = random_paged(
        ops, rng, seq_lens, new_tokens, heads, kv_heads, head_dim, block_size, dtype, padding_rows=1)
    assert ops.flash_applies(q, k_cache, v_cache, len(seq_lens))
    scale = 1 / math.sqrt(head_dim)
    ref = numpy_ops.paged_attention(q64[:num_tokens], k64, v64, tables, seq_lens, qsl, scale, window)
    for sms in (ops._multiprocessors, 1):   # keys split over blocks, then (as a long prefill) one split
        monkeypatch.setattr(ops, "_multiprocessors", sms)
        out = ops.paged_attention(q, k_cache, v_cache, cupy.asarray(tables), cupy.asarray(seq_lens),
                                  cupy.asarray(qsl), scale, window)
        what = f"flash prefill, {rows_per_warp} rows a warp, heads first {heads_first}, {sms} SMs' splits"
        assert_close(ops, out[:num_tokens], ref, dtype, what)
        assert not ops.to_host(out[num_tokens]).any(), f"{what}: the padding row must come back zero"
    # built wherever flash_attention_kernel is (an optional module: a failed build would only warn)
    assert ("flash_prefill_kernel", f"{_ctype(q, 'q')}, {head_dim}") in ops._functions
    if sm90 and head_dim in _FLASH_SM90_HEAD_DIMS:
        assert ("flash_prefill_sm90_kernel", f"{_ctype(q, 'q')}, {head_dim}") in ops._functions
        assert launched == ["flash_prefill_sm90_kernel"] * 2
    else:
        assert launched == ["flash_prefill_kernel" if rows_per_warp == 32 else "flash_attention_kernel"] * 2


def test_paged_attention_negative_scale(ops, rng, monkeypatch):
    """The flash kernels take each tile's max over unscaled scores, right for a positive scale
    only: a negative one goes to the general kernel and still matches the float64 reference."""
    monkeypatch.setattr(ops, "use_flash", True)
    heads, kv_heads, head_dim, block_size = 8, 2, 64, 16
    seq_lens = np.array([90, 40], dtype=np.int32)
    new_tokens = np.array([90, 1], dtype=np.int32)
    tables, k_cache, k64, v_cache, v64, qsl, q, q64, _ = random_paged(
        ops, rng, seq_lens, new_tokens, heads, kv_heads, head_dim, block_size, "bfloat16")
    assert ops.flash_applies(q, k_cache, v_cache, len(seq_lens))
    scale = -1 / math.sqrt(head_dim)
    out = ops.paged_attention(q, k_cache, v_cache, cupy.asarray(tables), cupy.asarray(seq_lens),
                              cupy.asarray(qsl), scale)
    ref = numpy_ops.paged_attention(q64, k64, v64, tables, seq_lens, qsl, scale)
    assert_close(ops, out, ref, "bfloat16", "negative scale")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("batch", [48, 3])
@pytest.mark.parametrize("decode_kernel", [True, False])
def test_paged_flash_decode_batch(ops, rng, dtype, batch, decode_kernel, monkeypatch):
    """A decode batch for the tensor-core kernels (the 4 heads of each KV head packed into
    one tile's rows), Llama-3-8B's head layout, ragged contexts: 48 rows fill the GPU, 3
    split each row's keys over blocks, whose last one merges them. flash_decode.cu, and
    flash_attention.cu's decode shape (what runs where flash_decode is switched off)."""
    monkeypatch.setattr(ops, "use_flash", True)
    monkeypatch.setattr(ops, "use_flash_decode", decode_kernel)
    heads, kv_heads, head_dim, block_size = 32, 8, 128, 16
    seq_lens = rng.integers(1, 700, batch).astype(np.int32)
    tables, num_blocks = random_block_tables(rng, seq_lens, block_size)
    k_cache, k64 = random_input(ops, rng, (num_blocks, block_size, kv_heads, head_dim), dtype)
    v_cache, v64 = random_input(ops, rng, (num_blocks, block_size, kv_heads, head_dim), dtype)
    qsl = np.arange(batch + 1, dtype=np.int32)
    q, q64 = random_input(ops, rng, (batch + 1, heads, head_dim), dtype)
    assert ops.flash_applies(q, k_cache, v_cache, batch)
    scale = 1 / math.sqrt(head_dim)
    out = ops.paged_attention(q, k_cache, v_cache, cupy.asarray(tables), cupy.asarray(seq_lens),
                              cupy.asarray(qsl), scale)
    ref = numpy_ops.paged_attention(q64[:batch], k64, v64, tables, seq_lens, qsl, scale)
    assert_close(ops, out[:batch], ref, dtype, "flash decode")
    assert not ops.to_host(out[batch]).any(), "the padding row must come back zero"


def flash_decode_on(ops, monkeypatch) -> list[str]:
    """flash_decode.cu on (even where SHARDLINE_GPU_OFF names it); the names of the kernels
    ops launches from here on, in order."""
    monkeypatch.setattr(ops, "use_flash", True)
    monkeypatch.setattr(ops, "use_flash_decode", True)
    launched, launch = [], ops._launch
    monkeypatch.setattr(ops, "_launch", lambda name, *args, **kw: (launched.append(name), launch(name, *args, **kw))[1])
    return launched


def decode_step(ops, rng, dtype, batch, queries, max_len, block_size, kv_heads, head_dim):
    """A decode step's paged inputs: seq_lens (queries to max_len keys), block tables over a
    shuffled pool, query_start_loc of `queries` tokens a sequence, and random caches (on the
    device and in float64)."""
    seq_lens = rng.integers(queries, max_len, batch).astype(np.int32)
    tables, num_blocks = random_block_tables(rng, seq_lens, block_size)
    k_cache = random_input(ops, rng, (num_blocks, block_size, kv_heads, head_dim), dtype)
    v_cache = random_input(ops, rng, (num_blocks, block_size, kv_heads, head_dim), dtype)
    return seq_lens, tables, np.arange(batch + 1, dtype=np.int32) * queries, k_cache, v_cache


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("batch,max_len", [(2, 600), (2, 40), (40, 600)])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,queries,window", [
    (32, 8, 128, 16, 1, None),   # Llama-3-8B
    (9, 3, 64, 16, 1, None),     # SmolLM2: 3 heads a KV head
    (8, 8, 80, 5, 1, 37),        # no grouping, blocks of 5 keys, a window
    (16, 2, 128, 1, 1, 100),     # 8 heads a KV head (all 8 rows), blocks of one key, a window
    (8, 2, 96, 16, 2, None),     # two queries a sequence (speculative decoding's shape)
])
def test_flash_decode_kernel(ops, rng, dtype, batch, max_len, heads, kv_heads, head_dim, block_size, queries,
                             window, monkeypatch):
    """flash_decode.cu (keys as the mma's rows, 8 packed rows a block) against the float64
    reference: head groupings of 1-8, head sizes, windows, cache blocks of 1-16 keys, key
    splits (batch 2; under 40 keys, fewer key tiles than the launch has splits) and none
    (batch 40), a padding row, with each instantiated tile shape (keys, stages, warps a
    block); and that this kernel is the one run. With one query a sequence, also told so
    (one_query_each: no tile lookup; the same result bit for bit), with no minimum of keys a
    split (decode_min_split_keys 16: one key tile, as before the minimum) and with the split's
    first table entries looked up after its range (decode_table_ahead off: bit for bit too)."""
    launched = flash_decode_on(ops, monkeypatch)
    seq_lens, tables, qsl, (k_cache, k64), (v_cache, v64) = decode_step(ops, rng, dtype, batch, queries, max_len,
                                                                         block_size, kv_heads, head_dim)
    num_tokens = batch * queries
    q, q64 = random_input(ops, rng, (num_tokens + 1, heads, head_dim), dtype)
    scale = 1 / math.sqrt(head_dim)
    ref = numpy_ops.paged_attention(q64[:num_tokens], k64, v64, tables, seq_lens, qsl, scale, window)
    tiles = [tile for tile in dict.fromkeys(tile for tile, _ in ops.decode_tiles)   # those this GPU can run
             if ("flash_decode_kernel", flash_decode_template(_ctype(q, "q"), head_dim, tile)) in ops._functions]
    shipped = ops.decode_min_split_keys
    settings = [(False, shipped, True), (False, shipped, False)]   # (one_query_each, min keys, table ahead)
    if queries == 1:
        settings += [(True, shipped, True), (True, 16, True)]
    for tile in tiles:
        monkeypatch.setattr(ops, "decode_tiles", ((tile, math.inf),))
        outs = {}
        for one_query, min_keys, ahead in settings:
            monkeypatch.setattr(ops, "decode_min_split_keys", min_keys)
            monkeypatch.setattr(ops, "decode_table_ahead", ahead)
            out = ops.paged_attention(q, k_cache, v_cache, cupy.asarray(tables), cupy.asarray(seq_lens),
                                      cupy.asarray(qsl), scale, window, one_query_each=one_query)
            what = (f"flash decode kernel, tile {tile}, one_query_each {one_query}, splits of >= {min_keys} keys, "
                    f"table ahead {ahead}")
            assert_close(ops, out[:num_tokens], ref, dtype, what)
            assert not ops.to_host(out[num_tokens]).any(), f"{what}: the padding row must come back zero"
            outs[one_query, min_keys, ahead] = ops.to_host(out)
        assert np.array_equal(outs[False, shipped, True], outs[False, shipped, False]), \
            "table ahead on and off must be bit-identical"
        if queries == 1:
            assert np.array_equal(outs[True, shipped, True], outs[False, shipped, True]), "the same tiles and splits"
    assert launched == ["flash_decode_kernel"] * len(tiles) * len(settings)


@pytest.mark.parametrize("one_query", [False, True])
def test_flash_decode_two_row_tiles_a_sequence(ops, rng, one_query, monkeypatch):
    """16 query heads a KV head at one sequence and no padding row (a 1-row decode graph's
    launch): flash_decode.cu runs the sequence's 16 packed rows as two tiles of 8, found by the
    lookup or, told one query a sequence, from the block index; against the float64 reference."""
    launched = flash_decode_on(ops, monkeypatch)
    seq_lens, tables, qsl, (k_cache, k64), (v_cache, v64) = decode_step(ops, rng, "bfloat16", 1, 1, 700, 16, 2, 64)
    q, q64 = random_input(ops, rng, (1, 32, 64), "bfloat16")
    out = ops.paged_attention(q, k_cache, v_cache, cupy.asarray(tables), cupy.asarray(seq_lens), cupy.asarray(qsl),
                              0.125, one_query_each=one_query)
    ref = numpy_ops.paged_attention(q64, k64, v64, tables, seq_lens, qsl, 0.125)
    assert_close(ops, out, ref, "bfloat16", f"flash decode, two row tiles, one_query_each {one_query}")
    assert launched == ["flash_decode_kernel"]


def test_dependent_launches_match_ordinary_launches(ops, rng, monkeypatch):
    """Kernels launched as dependent launches (what graph capture uses: each may start while
    the one before runs, and waits for it before reading) chain correctly: a norm, the fused
    gate GEMM and the down GEMM, each reading the previous output, many times over, give
    exactly what ordinary launches give."""
    import ctypes
    from shardline.kernels import dependent_launch
    monkeypatch.setattr(ops, "use_dependent_launch", True)   # even where SHARDLINE_GPU_OFF names it
    assert ctypes.sizeof(dependent_launch._Attribute) == 72 and ctypes.sizeof(dependent_launch._Config) == 56
    x, _ = random_input(ops, rng, (1, 4096), "bfloat16")
    norm, _ = random_input(ops, rng, (4096,), "bfloat16")
    gate_up, _ = random_input(ops, rng, (2 * 1536, 4096), "bfloat16", scale=1 / 64)
    down, _ = random_input(ops, rng, (4096, 1536), "bfloat16", scale=1 / 40)

    def chain():
        h = x
        for _ in range(8):
            h, _ = ops.rms_norm(h, norm, 1e-5, residual=x)
            h = ops.linear(ops.gated_linear(h, gate_up), down)
        return ops.to_host(h)

    ordinary = chain()
    with ops.dependent_launches():
        dependent = chain()
    assert np.isfinite(ordinary).all()
    np.testing.assert_array_equal(dependent, ordinary)
