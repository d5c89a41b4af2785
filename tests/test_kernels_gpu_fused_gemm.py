"""What the decode GEMM (skinny_gemm.cu) takes in: the RMSNorm before it (norm_skinny_gemm_kernel,
the norm streamed with the weights) and a QKV projection's RoPE and KV-cache write after it
(skinny_gemm_rope_kernel, norm_skinny_gemm_rope_kernel), against the NumPy float64 reference
and the kernels they replace: hidden 576 to 8192, with and without a residual, a bias, the
SiLU gate, K split over 1, 2 and 4 warps, and dependent launches (as captured graphs launch them).
Same fixtures as test_kernels_gpu.py; skipped without CuPy or a GPU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from gpu_guard import cupy  # noqa: F401, E402  (skips the module without a GPU)

from shardline.kernels import numpy_ops  # noqa: E402
from shardline.kernels.cuda_common import _skinny_tiles  # noqa: E402
from shardline.kernels.rope import rope_cos_sin  # noqa: E402
from test_kernels_gpu import TOLERANCE, assert_close, ops, poisoned_allocations, random_input, rng  # noqa: E402, F401

pytestmark = pytest.mark.gpu


def relative_error(ops, got, want) -> float:
    got = ops.to_host(got).astype(np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("tokens,hidden,n,gated,with_residual,with_bias", [
    (1, 4096, 6144, False, True, False),    # Llama-3-8B's QKV
    (1, 4096, 14336, True, True, False),    # and its gate/up
    (2, 576, 37, False, False, True),       # no residual (a first layer), a bias, a part-filled block
    (3, 2048, 129, True, True, False),
    (4, 4096, 1000, False, True, True),
    (1, 8192, 200, True, True, False),      # wider than rms_norm_vec_kernel's vectors
])
def test_fused_norm_gemm_against_float64_and_the_two_kernels(ops, rng, dtype, tokens, hidden, n, gated,
                                                             with_residual, with_bias, monkeypatch):
    monkeypatch.setattr(ops, "use_skinny_gemm", True)
    monkeypatch.setattr(ops, "fused_norm_max_rows", 4)        # every shape the kernel takes
    monkeypatch.setattr(ops, "fused_norm_max_bytes", 1 << 40)
    x, x64 = random_input(ops, rng, (tokens, hidden), dtype)
    res, res64 = random_input(ops, rng, (tokens, hidden), dtype) if with_residual else (None, None)
    norm, norm64 = random_input(ops, rng, (hidden,), dtype)
    w, w64 = random_input(ops, rng, (2 * n if gated else n, hidden), dtype, scale=1 / math.sqrt(hidden))
    b, b64 = random_input(ops, rng, (n,), dtype) if with_bias else (None, None)
    want64, want_res64 = numpy_ops.rms_norm_linear(x64, norm64, 1e-5, res64, w64, b64, gated)
    for k_split in (1, 2, 4):
        monkeypatch.setattr(ops, "skinny_k_split", k_split)
        monkeypatch.setattr(ops, "fused_norm_gemm", False)
        two_y, two_res = ops.rms_norm_linear(x, norm, 1e-5, res, w, b, gated)
        monkeypatch.setattr(ops, "fused_norm_gemm", True)
        assert ops._norm_gemm_applies(x, norm, res, w, b, gated)
        for dependent in (False, True):   # True: as in captured graphs
            monkeypatch.setattr(ops, "use_dependent_launch", dependent)
            with ops.dependent_launches():
                y, new_res = ops.rms_norm_linear(x, norm, 1e-5, res, w, b, gated)
            what = f"K in {k_split}, dependent launch {dependent}"
            assert y.shape == (tokens, n)
            # Not rounded to storage between the norm and the GEMM: at least as close to float64.
            fused_err, two_err = relative_error(ops, y, want64), relative_error(ops, two_y, want64)
            assert_close(ops, y, want64, dtype, f"fused norm GEMM, {what}")
            assert fused_err <= 1.5 * two_err + 1e-4, f"{what}: fused {fused_err:.3g}, two kernels {two_err:.3g}"
            if res is None:
                assert new_res is x   # the residual stream starts as x, as Norm's callers keep it
            else:
                np.testing.assert_array_equal(ops.to_host(new_res), ops.to_host(two_res), err_msg=what)
                assert_close(ops, new_res, want_res64, dtype, f"fused norm residual, {what}")


def test_fused_norm_gemm_falls_back_where_it_does_not_apply(ops, rng, monkeypatch):
    """Too many rows, fp32, a gated bias, a weight of another width: the two kernels (or
    cuBLAS) run, as with the fusion off."""
    monkeypatch.setattr(ops, "use_skinny_gemm", True)
    monkeypatch.setattr(ops, "fused_norm_gemm", True)
    cases = [((5, 576), (64, 576), False, False), ((1, 576), (64, 576), True, True)]
    for (x_shape, w_shape, gated, with_bias) in cases:
        x, x64 = random_input(ops, rng, x_shape, "bfloat16")
        norm, norm64 = random_input(ops, rng, x_shape[1:], "bfloat16")
        w, w64 = random_input(ops, rng, w_shape, "bfloat16", scale=1 / math.sqrt(x_shape[1]))
        b, b64 = random_input(ops, rng, (w_shape[0],), "bfloat16") if with_bias else (None, None)
        assert not ops._norm_gemm_applies(x, norm, x, w, b, gated)
        y, new_res = ops.rms_norm_linear(x, norm, 1e-5, x, w, b, gated)
        want64, want_res64 = numpy_ops.rms_norm_linear(x64, norm64, 1e-5, x64, w64, b64, gated)
        assert_close(ops, y, want64, "bfloat16", f"fallback {x_shape} {w_shape}")
        assert_close(ops, new_res, want_res64, "bfloat16", f"fallback residual {x_shape}")
    x32, _ = random_input(ops, rng, (1, 576), "float32")
    assert not ops._norm_gemm_applies(x32, x32[0], None, cupy.zeros((8, 576), cupy.float32), None, False)
    x16, _ = random_input(ops, rng, (3, 576), "bfloat16")
    w16, _ = random_input(ops, rng, (8, 512), "bfloat16")
    assert not ops._norm_gemm_applies(x16, x16[0], None, w16, None, False)   # another width


def test_fused_norm_gemm_runs_where_it_was_measured_faster(ops, rng, monkeypatch):
    """By default the fusion takes latency-bound GEMMs only: at most fused_norm_max_rows rows
    and a weight of at most fused_norm_max_bytes."""
    monkeypatch.setattr(ops, "use_skinny_gemm", True)
    x, _ = random_input(ops, rng, (3, 1024), "bfloat16")
    small, _ = random_input(ops, rng, (64, 1024), "bfloat16")
    large, _ = random_input(ops, rng, (ops.fused_norm_max_bytes // 2048 + 8, 1024), "bfloat16")
    rows = ops.fused_norm_max_rows
    assert ops._norm_gemm_applies(x[:rows], x[0], None, small, None, False)
    assert not ops._norm_gemm_applies(x[:rows + 1], x[0], None, small, None, False)
    assert not ops._norm_gemm_applies(x[:1], x[0], None, large, None, False)


ULP = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}


def assert_within_a_rounding(ops, got, want, dtype, what):
    """Rotated heads got and want (device arrays, head_dim last, rotate-half pairs i and
    i + head_dim / 2) equal but for the last bit of a rounding of the projection before RoPE
    and of the result. A rotation x1 c - x2 s can cancel: a last-bit change of x1 or x2 moves
    it by up to ULP (|x1| + |x2|) <= ULP sqrt(2) |pair|, whatever the result's own size (an
    element-relative bound failed 1 of 4096 once, with the norm fused)."""
    got, want = ops.to_host(got).astype(np.float64), ops.to_host(want).astype(np.float64)
    half = want.shape[-1] // 2
    pair = np.hypot(want[..., :half], want[..., half:])
    pair = np.concatenate([pair, pair], axis=-1)
    far = np.abs(got - want) > ULP[dtype] * (np.abs(want) + 1.5 * pair) + 1e-30
    assert not far.any(), f"{what}: {far.sum()} of {far.size} differ by more than a rounding"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("tokens,hidden,heads,kv_heads,head_dim,with_residual,fuse_norm", [
    (1, 4096, 32, 8, 128, True, False),     # Llama-3-8B's attention
    (1, 576, 9, 3, 64, True, True),         # SmolLM2's, the norm fused too
    (2, 576, 9, 3, 64, False, True),        # no residual (a first layer)
    (4, 1024, 8, 2, 64, True, False),
    (3, 512, 4, 4, 32, True, True),
])
def test_qkv_rope_gemm_against_float64_and_the_kernels_it_replaces(ops, rng, dtype, tokens, hidden, heads,
                                                                   kv_heads, head_dim, with_residual, fuse_norm,
                                                                   monkeypatch):
    monkeypatch.setattr(ops, "use_skinny_gemm", True)
    monkeypatch.setattr(ops, "fused_norm_gemm", fuse_norm)
    monkeypatch.setattr(ops, "fused_norm_max_rows", 4)
    num_blocks, block_size = 5, 16
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    x, x64 = random_input(ops, rng, (tokens, hidden), dtype)
    res, res64 = random_input(ops, rng, (tokens, hidden), dtype) if with_residual else (None, None)
    norm, norm64 = random_input(ops, rng, (hidden,), dtype)
    w, w64 = random_input(ops, rng, ((heads + 2 * kv_heads) * head_dim, hidden), dtype, scale=1 / math.sqrt(hidden))
    table = rope_cos_sin(head_dim, 4096, 500000.0)
    positions = rng.integers(0, 4096, size=tokens)
    slots = rng.choice(num_blocks * block_size, size=tokens, replace=False)
    if tokens > 1:
        slots[-1] = -1   # a padding row: its k and v are not stored
    k_start, k_start64 = random_input(ops, rng, cache_shape, dtype)
    v_start, v_start64 = random_input(ops, rng, cache_shape, dtype)
    kc64, vc64, ref_slots = k_start64.copy(), v_start64.copy(), slots.copy()
    ref_slots[slots < 0] = np.setdiff1d(np.arange(num_blocks * block_size), slots)[0]   # NumPy has no skip
    q64, want_res64 = numpy_ops.rms_norm_qkv_rope(x64, norm64, 1e-5, res64, w64, None, positions, table, heads,
                                                  kc64, vc64, ref_slots)
    args = (cupy.asarray(positions), cupy.asarray(table, dtype=cupy.float32), heads)
    for k_split in (1, 2, 4):
        monkeypatch.setattr(ops, "skinny_k_split", k_split)
        caches = {}
        for fused in (False, True):
            monkeypatch.setattr(ops, "fused_rope_gemm", fused)
            assert ops._rope_gemm_applies(x, norm, w, None, heads, args[1], k_start, v_start) == fused
            k_cache, v_cache = k_start.copy(), v_start.copy()
            with ops.dependent_launches():   # as in captured graphs (where use_dependent_launch)
                q, new_res = ops.rms_norm_qkv_rope(x, norm, 1e-5, res, w, None, *args, k_cache, v_cache,
                                                   cupy.asarray(slots))
            caches[fused] = q, new_res, k_cache, v_cache
        what = f"K in {k_split}"
        (q0, res0, k0, v0), (q1, res1, k1, v1) = caches[False], caches[True]
        assert q1.shape == (tokens, heads, head_dim)
        assert_within_a_rounding(ops, q1, q0, dtype, f"q, {what}")
        assert_within_a_rounding(ops, k1, k0, dtype, f"k cache, {what}")
        np.testing.assert_array_equal(ops.to_host(v1), ops.to_host(v0), err_msg=f"v cache, {what}")
        np.testing.assert_array_equal(ops.to_host(res1), ops.to_host(res0), err_msg=f"residual, {what}")
        assert_close(ops, q1, q64, dtype, f"fused rope GEMM q, {what}")
        stored = slots[slots >= 0]
        for got, want, start, name in ((k1, kc64, k_start64, "k"), (v1, vc64, v_start64, "v")):
            rows = ops.to_host(got).reshape(-1, kv_heads, head_dim).astype(np.float64)
            want_rows = want.reshape(rows.shape)[stored]
            err = np.linalg.norm(rows[stored] - want_rows) / np.linalg.norm(want_rows)
            assert err <= TOLERANCE[dtype], f"{name} cache rows, {what}: relative error {err:.3g}"
            others = np.setdiff1d(np.arange(len(rows)), stored)   # the padding row's slot stays as it was
            np.testing.assert_array_equal(rows[others], start.reshape(rows.shape)[others], err_msg=name)
        if res is not None:
            assert_close(ops, res1, want_res64, dtype, f"residual, {what}")


@pytest.mark.parametrize("tokens", [1, 3])
def test_qkv_rope_gemm_looped_is_the_one_block_a_tile_launch_bitwise(ops, rng, tokens, monkeypatch):
    """Llama-3-8B's QKV projection with RoPE and the cache write on one block an SM looping
    over its tiles (skinny_gemm_rope_looped_kernel): q, the k and v caches bitwise those of a
    block a tile, at every K split."""
    monkeypatch.setattr(ops, "use_skinny_gemm", True)
    monkeypatch.setattr(ops, "fused_rope_gemm", True)
    monkeypatch.setattr(ops, "fused_norm_gemm", False)   # the norm apart: skinny_gemm_rope_kernel, which loops
    monkeypatch.setattr(ops, "skinny_looped_min_rows", 1)
    heads, kv_heads, head_dim, hidden = 32, 8, 128, 4096
    x, _ = random_input(ops, rng, (tokens, hidden), "bfloat16")
    norm, _ = random_input(ops, rng, (hidden,), "bfloat16")
    w, _ = random_input(ops, rng, ((heads + 2 * kv_heads) * head_dim, hidden), "bfloat16", scale=1 / 64)
    cache_shape = (4, 16, kv_heads, head_dim)
    k_start, _ = random_input(ops, rng, cache_shape, "bfloat16")
    v_start, _ = random_input(ops, rng, cache_shape, "bfloat16")
    positions = cupy.asarray(rng.integers(0, 4096, size=tokens))
    slots = cupy.asarray(rng.choice(64, size=tokens, replace=False))
    table = cupy.asarray(rope_cos_sin(head_dim, 4096, 500000.0), dtype=cupy.float32)
    for k_split in (1, 2, 4):
        monkeypatch.setattr(ops, "skinny_k_split", k_split)
        runs = []
        for per_sm in (0, 1, 64):   # 64: as many as fit an SM, several tiles a block
            monkeypatch.setattr(ops, "skinny_blocks_per_sm", per_sm)
            template = f"__nv_bfloat16, {tokens}, {k_split}"
            fits = ops._resident_blocks("skinny_gemm_rope_looped_kernel", template)
            tiles, blocks = _skinny_tiles(w.shape[0], False, k_split), min(per_sm, fits) * ops._multiprocessors
            assert ops._skinny_grid("skinny_gemm_rope_kernel", template, w.shape[0], False, k_split, tokens) == \
                (("skinny_gemm_rope_looped_kernel", (blocks,)) if 0 < blocks < tiles
                 else ("skinny_gemm_rope_kernel", (tiles,)))
            k_cache, v_cache = k_start.copy(), v_start.copy()
            with ops.dependent_launches():
                q, _ = ops.rms_norm_qkv_rope(x, norm, 1e-5, None, w, None, positions, table, heads, k_cache, v_cache,
                                             slots)
            runs.append([ops.to_host(a) for a in (q, k_cache, v_cache)])
        for run in runs[1:]:
            for got, want, name in zip(run, runs[0], ("q", "k cache", "v cache")):
                np.testing.assert_array_equal(got, want, err_msg=f"{name}, K in {k_split}")
        assert not np.array_equal(runs[0][1], ops.to_host(k_start))   # the tokens' keys were written


def test_qkv_rope_gemm_falls_back_where_it_does_not_apply(ops, rng, monkeypatch):
    """A bias (Qwen2's), too many rows, a projection that is not the caches' heads: the
    norm, GEMM and rope_write_kv run as separate ops, with the same results."""
    monkeypatch.setattr(ops, "use_skinny_gemm", True)
    monkeypatch.setattr(ops, "fused_rope_gemm", True)
    heads, kv_heads, head_dim, hidden = 4, 2, 32, 256
    table = rope_cos_sin(head_dim, 64, 10000.0)
    for tokens, with_bias, extra_rows in ((1, True, 0), (5, False, 0), (1, False, 8)):
        x, x64 = random_input(ops, rng, (tokens, hidden), "bfloat16")
        norm, norm64 = random_input(ops, rng, (hidden,), "bfloat16")
        w, w64 = random_input(ops, rng, ((heads + 2 * kv_heads) * head_dim + extra_rows, hidden), "bfloat16",
                              scale=1 / math.sqrt(hidden))
        b, b64 = random_input(ops, rng, (w.shape[0],), "bfloat16") if with_bias else (None, None)
        k_cache, kc64 = random_input(ops, rng, (3, 8, kv_heads, head_dim), "bfloat16")
        v_cache, vc64 = random_input(ops, rng, (3, 8, kv_heads, head_dim), "bfloat16")
        positions, slots = rng.integers(0, 64, size=tokens), rng.choice(24, size=tokens, replace=False)
        table32 = cupy.asarray(table, dtype=cupy.float32)
        assert not ops._rope_gemm_applies(x, norm, w, b, heads, table32, k_cache, v_cache)
        call = (x, norm, 1e-5, None, w, b, cupy.asarray(positions), table32, heads, k_cache, v_cache,
                cupy.asarray(slots))
        if extra_rows:
            with pytest.raises(ValueError, match="QKV projection width"):
                ops.rms_norm_qkv_rope(*call)
            continue
        q, _ = ops.rms_norm_qkv_rope(*call)
        q64, _ = numpy_ops.rms_norm_qkv_rope(x64, norm64, 1e-5, None, w64, b64, positions, table, heads, kc64, vc64,
                                             slots)
        assert_close(ops, q, q64, "bfloat16", f"fallback q, {tokens} tokens, bias {with_bias}")
        assert_close(ops, k_cache, kc64, "bfloat16", "fallback k cache")
