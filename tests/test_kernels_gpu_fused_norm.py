"""RMSNorm fused into the decode GEMM after it (norm_skinny_gemm_kernel, the norm streamed with
the weights) against the NumPy float64 reference and the two kernels it replaces: hidden 576,
2048 and 4096, with and without a residual, a bias, the SiLU gate, K split over 1, 2 and 4
warps, and dependent launches (as captured graphs launch it).
Same fixtures as test_kernels_gpu.py; skipped without CuPy or a GPU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from gpu_guard import cupy  # noqa: F401, E402  (skips the module without a GPU)

from shardline.kernels import numpy_ops  # noqa: E402
from test_kernels_gpu import assert_close, ops, poisoned_allocations, random_input, rng  # noqa: E402, F401

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
