"""RMSNorm fused into the decode GEMM after it (norm_skinny_gemm_kernel) against the two
kernels it replaces, value for value, and against the NumPy float64 reference: the norm's
three thread counts (hidden 576, 2048, 4096), with and without a residual, a bias, the SiLU
gate, K split over 1, 2 and 4 warps, a block a tile or few blocks looping over many, and
dependent launches (as captured graphs launch it).
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


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("tokens,hidden,n,gated,with_residual,with_bias", [
    (1, 4096, 6144, False, True, False),    # Llama-3-8B's QKV
    (1, 4096, 14336, True, True, False),    # and its gate/up
    (2, 576, 37, False, False, True),       # 32 norm threads, no residual (a first layer), a bias
    (3, 2048, 129, True, True, False),      # 64 norm threads
    (4, 4096, 1000, False, True, True),
    (1, 576, 200, True, True, False),       # small enough for one block to loop over every tile
])
def test_fused_norm_gemm_is_the_two_kernels(ops, rng, dtype, tokens, hidden, n, gated, with_residual, with_bias,
                                            monkeypatch):
    monkeypatch.setattr(ops, "use_skinny_gemm", True)
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
        assert ops._norm_gemm_threads(x, norm, res, w, b, gated) == 32 * math.ceil(hidden / 1024)
        # An SM's worth of blocks; a block a tile; one block looping over every tile (small weights).
        for waves in (1.0, 0.0) + ((1e-4,) if w.size <= 1 << 23 else ()):
            monkeypatch.setattr(ops, "fused_norm_waves", waves)
            y, new_res = ops.rms_norm_linear(x, norm, 1e-5, res, w, b, gated)
            what = f"K in {k_split}, waves {waves}"
            assert y.shape == (tokens, n)
            np.testing.assert_array_equal(ops.to_host(y), ops.to_host(two_y), err_msg=what)
            np.testing.assert_array_equal(ops.to_host(new_res), ops.to_host(two_res), err_msg=what)
            assert_close(ops, y, want64, dtype, f"fused norm GEMM, {what}")
            if res is None:
                assert new_res is x   # the residual stream starts as x, as Norm's callers keep it
            else:
                assert_close(ops, new_res, want_res64, dtype, f"fused norm residual, {what}")
        monkeypatch.setattr(ops, "use_dependent_launch", True)   # as in captured graphs
        with ops.dependent_launches():
            y, new_res = ops.rms_norm_linear(x, norm, 1e-5, res, w, b, gated)
        np.testing.assert_array_equal(ops.to_host(y), ops.to_host(two_y), err_msg=f"dependent, K in {k_split}")
        np.testing.assert_array_equal(ops.to_host(new_res), ops.to_host(two_res))


def test_fused_norm_gemm_falls_back_where_it_does_not_apply(ops, rng, monkeypatch):
    """Too many rows, a norm wider than a block's threads cover, fp32, a gated bias: the
    two kernels (or cuBLAS) run, with the same results as with the fusion off."""
    monkeypatch.setattr(ops, "use_skinny_gemm", True)
    monkeypatch.setattr(ops, "fused_norm_gemm", True)
    cases = [((5, 576), (64, 576), False, False), ((1, 8192), (64, 8192), False, False),
             ((1, 576), (64, 576), True, True)]
    for (x_shape, w_shape, gated, with_bias) in cases:
        x, x64 = random_input(ops, rng, x_shape, "bfloat16")
        norm, norm64 = random_input(ops, rng, x_shape[1:], "bfloat16")
        w, w64 = random_input(ops, rng, w_shape, "bfloat16", scale=1 / math.sqrt(x_shape[1]))
        b, b64 = random_input(ops, rng, (w_shape[0],), "bfloat16") if with_bias else (None, None)
        assert ops._norm_gemm_threads(x, norm, x, w, b, gated) == 0
        y, new_res = ops.rms_norm_linear(x, norm, 1e-5, x, w, b, gated)
        want64, want_res64 = numpy_ops.rms_norm_linear(x64, norm64, 1e-5, x64, w64, b64, gated)
        assert_close(ops, y, want64, "bfloat16", f"fallback {x_shape} {w_shape}")
        assert_close(ops, new_res, want_res64, "bfloat16", f"fallback residual {x_shape}")
    x32, _ = random_input(ops, rng, (1, 576), "float32")
    assert ops._norm_gemm_threads(x32, x32[0], None, cupy.zeros((8, 576), cupy.float32), None, False) == 0
