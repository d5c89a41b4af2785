"""A folded RMSNorm (its weight in the next GEMM's columns: models/layers.py Norm) run by the
kernel after a cuBLAS GEMM (norm_in_consumer): silu_and_mul and rope_write_kv scaling each row
by 1 / rms of the stream, against the NumPy float64 reference; rms_norm_linear and
rms_norm_qkv_rope taking that path (no norm kernel) with the values of the unit-weight norm
kernel then the GEMM, and leaving it where it does not apply; dependent launches too.
Same fixtures as test_kernels_gpu.py; skipped without CuPy or a GPU.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest

from gpu_guard import cupy  # noqa: E402  (skips the module without a GPU)

from shardline.kernels import numpy_ops  # noqa: E402
from shardline.kernels.rope import rope_cos_sin  # noqa: E402
from test_kernels_gpu import assert_close, ops, poisoned_allocations, random_input, rng  # noqa: E402, F401

pytestmark = pytest.mark.gpu


def launches(ops, monkeypatch, templates: bool = False) -> list:
    """The names of the kernels ops launches from now on ((name, template arguments) pairs with
    templates)."""
    names, launch = [], ops._launch
    monkeypatch.setattr(ops, "_launch", lambda name, ctype, *args, **kw: (
        names.append((name, ctype) if templates else name), launch(name, ctype, *args, **kw))[1])
    return names


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("rows,hidden,inter", [(3, 4096, 14336), (64, 576, 1536), (17, 2048, 264)])
@pytest.mark.parametrize("dependent", [False, True])
def test_silu_and_mul_scaled_by_the_rows_rms(ops, rng, monkeypatch, dtype, rows, hidden, inter, dependent):
    names = launches(ops, monkeypatch)
    stream, stream64 = random_input(ops, rng, (rows, hidden), dtype, scale=3.0)
    gate_up, gate_up64 = random_input(ops, rng, (rows, 2 * inter), dtype, scale=4.0)
    with ops.dependent_launches() if dependent else contextlib.nullcontext():   # as in captured graphs
        out = ops.silu_and_mul(gate_up, rms_of=stream, eps=1e-5)
    assert names == ["silu_and_mul_rms_vec_kernel"]
    assert_close(ops, out, numpy_ops.silu_and_mul(gate_up64, rms_of=stream64, eps=1e-5), dtype, "silu_and_mul rms")
    with pytest.raises(ValueError, match="rms_of"):
        ops.silu_and_mul(gate_up, rms_of=stream[:rows - 1], eps=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("head_dim", [128, 40])
@pytest.mark.parametrize("dependent", [False, True])
def test_rope_write_kv_scaled_by_the_rows_rms(ops, rng, monkeypatch, dtype, head_dim, dependent):
    """Eight pairs a thread at 16-bit head size 128 (16-byte reads of the stream), one at 40 or
    in float32; q, k and v all scaled; tokens whose slots are out of range (-1, past the cache)
    rotate q and store nothing, yet sum their rows with the rest of the block."""
    num_blocks, block_size, kv_heads, heads, tokens, hidden = 6, 4, 2, 6, 9, 264
    k_cache, kc64 = random_input(ops, rng, (num_blocks, block_size, kv_heads, head_dim), dtype)
    v_cache, vc64 = random_input(ops, rng, (num_blocks, block_size, kv_heads, head_dim), dtype)
    qkv, qkv64 = random_input(ops, rng, (tokens, (heads + 2 * kv_heads) * head_dim), dtype, scale=5.0)
    stream, stream64 = random_input(ops, rng, (tokens, hidden), dtype, scale=7.0)
    q, k, v = numpy_ops.split_qkv(qkv, heads, k_cache)
    q64, k64, v64 = numpy_ops.split_qkv(qkv64, heads, kc64)
    table = rope_cos_sin(head_dim, 256, 10000.0).astype(np.float32)
    positions = rng.integers(0, 256, size=tokens)
    slots = rng.choice(num_blocks * block_size, size=tokens, replace=False).astype(np.int64)
    slots[[2, 5]] = -1, num_blocks * block_size
    names = launches(ops, monkeypatch, templates=True)
    with ops.dependent_launches() if dependent else contextlib.nullcontext():
        q_out = ops.rope_write_kv(q, k, v, cupy.asarray(positions), cupy.asarray(table), k_cache, v_cache,
                                  cupy.asarray(slots), rms_of=stream, eps=1e-6)
    ctype = {"bfloat16": "__nv_bfloat16", "float16": "__half", "float32": "float"}[dtype]
    vec = head_dim == 128 and dtype != "float32"
    assert names == [("rope_write_kv_kernel", f"{ctype}, {8 if vec else 1}")]
    kept = slots >= 0   # the reference stores only the in-range tokens; q is every token's
    kept[5] = False
    table64 = table.astype(np.float64)
    q_ref = numpy_ops.rope_write_kv(q64, k64, v64, positions, table64, kc64.copy(), vc64.copy(),
                                    np.where(kept, slots, 0), rms_of=stream64, eps=1e-6)
    numpy_ops.rope_write_kv(q64[kept], k64[kept], v64[kept], positions[kept], table64, kc64, vc64, slots[kept],
                            rms_of=stream64[kept], eps=1e-6)
    assert_close(ops, q_out, q_ref, dtype, "rope_write_kv rms q")
    assert_close(ops, k_cache, kc64, dtype, "rope_write_kv rms k cache")
    assert_close(ops, v_cache, vc64, dtype, "rope_write_kv rms v cache")


def folded_inputs(ops, rng, rows, hidden, out_rows, dtype="bfloat16"):
    """(stream, ones as the folded norm's weight, a weight whose columns hold a norm weight)."""
    stream, _ = random_input(ops, rng, (rows, hidden), dtype, scale=2.0)
    gamma = 1.0 + 0.5 * rng.standard_normal(hidden)
    w, _ = random_input(ops, rng, (out_rows, hidden), dtype, scale=1 / math.sqrt(hidden))
    folded = ops.from_float(ops.to_host(w) * gamma, dtype)
    return stream, ops.from_float(np.ones(hidden), dtype), folded


def relative_error(ops, got, want) -> float:
    got, want = ops.to_host(got).astype(np.float64), ops.to_host(want).astype(np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("rows", [5, 16, 64])
def test_folded_norm_runs_in_the_ops_after_the_gemm(ops, rng, monkeypatch, rows):
    """Llama-3-8B's gate/up and QKV at cuBLAS row counts: no norm kernel, the GEMM then the
    scaling op; the same values as the unit-weight norm kernel then the GEMM, to the roundings the
    norm's output no longer takes."""
    monkeypatch.setattr(ops, "norm_in_consumer", True)
    assert not ops._skinny_applies(cupy.empty((rows, 4096), cupy.uint16), cupy.empty((8, 4096), cupy.uint16))
    hidden, inter, heads, kv_heads, head_dim = 4096, 14336, 32, 8, 128
    stream, ones, gate_up = folded_inputs(ops, rng, rows, hidden, 2 * inter)
    names = launches(ops, monkeypatch)
    h, res = ops.rms_norm_linear(stream, ones, 1e-5, None, gate_up, gated=True, folded=True)
    assert res is stream and "silu_and_mul_rms_vec_kernel" in names and not any("norm" in n for n in names)
    h_unfused, _ = ops.rms_norm_linear(stream, ones, 1e-5, None, gate_up, gated=True)
    assert relative_error(ops, h, h_unfused) < 1e-2

    _, _, qkv_w = folded_inputs(ops, rng, rows, hidden, (heads + 2 * kv_heads) * head_dim)
    caches = [cupy.zeros((8, 16, kv_heads, head_dim), dtype=cupy.uint16) for _ in range(4)]
    table = cupy.asarray(rope_cos_sin(head_dim, 512, 500000.0), dtype=cupy.float32)
    positions = cupy.asarray(rng.integers(0, 512, size=rows))
    slots = cupy.asarray(rng.choice(128, size=rows, replace=False))
    names.clear()
    q, res = ops.rms_norm_qkv_rope(stream, ones, 1e-5, None, qkv_w, None, positions, table, heads, *caches[:2],
                                   slots, folded=True)
    assert res is stream and "rope_write_kv_kernel" in names and not any("norm" in n for n in names)
    q_unfused, _ = ops.rms_norm_qkv_rope(stream, ones, 1e-5, None, qkv_w, None, positions, table, heads,
                                         *caches[2:], slots)
    assert relative_error(ops, q, q_unfused) < 1e-2
    for got, want in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert relative_error(ops, got, want) < 1e-2


def test_folded_norm_keeps_its_kernel_where_the_path_does_not_apply(ops, rng, monkeypatch):
    """A residual to add, a bias, the skinny GEMM's row counts, more than
    norm_in_consumer_max_rows rows, fp16, or the path off: the norm kernel runs (and only the
    last case, bf16 with the path on, runs none)."""
    monkeypatch.setattr(ops, "norm_in_consumer_max_rows", 8)
    hidden, inter = 1024, 512
    names = launches(ops, monkeypatch)
    cases = ((6, True, False, True, "bfloat16"), (6, False, True, True, "bfloat16"),
             (1, False, False, True, "bfloat16"), (9, False, False, True, "bfloat16"),
             (6, False, False, True, "float16"), (6, False, False, False, "bfloat16"),
             (6, False, False, True, "bfloat16"))
    for case in cases:
        rows, with_residual, with_bias, on, dtype = case
        monkeypatch.setattr(ops, "norm_in_consumer", on)
        stream, ones, w = folded_inputs(ops, rng, rows, hidden, 2 * inter, dtype)
        residual = random_input(ops, rng, (rows, hidden), dtype)[0] if with_residual else None
        bias = random_input(ops, rng, (2 * inter,), dtype)[0] if with_bias else None
        names.clear()
        ops.rms_norm_linear(stream, ones, 1e-5, residual, w, bias, gated=True, folded=True)
        in_consumer = case == cases[-1]
        assert ("silu_and_mul_rms_vec_kernel" in names) == in_consumer, (case, names)
        assert any("norm" in n for n in names) != in_consumer, (case, names)
