"""ops.expert_linear on the GPU (expert_gemm.cu): each (token, slot) pair's expert picked on the
device from a stack of expert weights, against float64 (numpy_ops.expert_linear) and bitwise the
one-row skinny GEMM by that expert's weight alone, K split over 1, 2 and 4 warps; inputs it does
not take are refused with a message."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gpu_guard import cupy  # noqa: E402  (skips the module without a GPU)

from shardline.kernels import numpy_ops  # noqa: E402
from test_kernels_gpu import assert_close, ops, random_input, rng  # noqa: E402, F401  (fixtures: ops, rng)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("rows,pairs,k,n,gated", [(1, 2, 4096, 14336, True), (3, 6, 576, 37, False),
                                                  (4, 4, 72, 129, False), (2, 6, 64, 3, True)])
def test_expert_linear(ops, rng, dtype, rows, pairs, k, n, gated, monkeypatch):
    num_experts = 5
    x, x64 = random_input(ops, rng, (rows, k), dtype)
    w, w64 = random_input(ops, rng, (num_experts, 2 * n if gated else n, k), dtype, scale=1 / math.sqrt(k))
    experts = rng.integers(0, num_experts, pairs).astype(np.int32)
    assert ops.expert_linear_applies(x, w)
    for k_split in (1, 2, 4):
        monkeypatch.setattr(ops, "skinny_k_split", k_split)
        out = ops.expert_linear(x, w, cupy.asarray(experts), gated=gated)
        assert out.shape == (pairs, n)
        assert_close(ops, out, numpy_ops.expert_linear(x64, w64, experts, gated), dtype, f"K in {k_split}")
        for pair, expert in enumerate(experts):
            row = x[pair % rows:][:1]
            alone = ops.gated_linear(row, w[int(expert)]) if gated else ops.linear(row, w[int(expert)])
            np.testing.assert_array_equal(ops.to_host(out[pair:pair + 1]), ops.to_host(alone), f"pair {pair}")


def test_expert_linear_takes_the_nearest_expert_for_an_id_out_of_range(ops, rng):
    """A NaN row's id (topk_softmax leaves INT_MAX) reads a real expert, not past the stack."""
    x, _ = random_input(ops, rng, (1, 64), "bfloat16")
    w, _ = random_input(ops, rng, (3, 16, 64), "bfloat16")
    out = ops.to_host(ops.expert_linear(x, w, cupy.asarray([2**31 - 1, -5], dtype=cupy.int32)))
    np.testing.assert_array_equal(out[0], ops.to_host(ops.linear(x, w[2]))[0])
    np.testing.assert_array_equal(out[1], ops.to_host(ops.linear(x, w[0]))[0])


def test_expert_linear_refuses_what_it_cannot_run(ops, rng):
    x, _ = random_input(ops, rng, (2, 64), "bfloat16")
    w, _ = random_input(ops, rng, (3, 16, 64), "bfloat16")
    with pytest.raises(ValueError, match="3 pairs for 2 rows"):
        ops.expert_linear(x, w, cupy.asarray([0, 1, 2], dtype=cupy.int32))
    x32 = cupy.zeros((1, 64), dtype=cupy.float32)
    assert not ops.expert_linear_applies(x32, w)
    with pytest.raises(ValueError, match="no 16-bit skinny GEMM"):
        ops.expert_linear(x32, w, cupy.asarray([0], dtype=cupy.int32))
