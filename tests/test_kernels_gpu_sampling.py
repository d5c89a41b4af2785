"""CudaOps' sampling ops against the NumPy reference, on a GPU: penalties, greedy and
seeded top-k / top-p / min-p sampling, the counter-based noise, batch independence.
Same fixtures as test_kernels_gpu.py (fresh seeds, NaN-poisoned allocations); skipped
without CuPy or a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpu_guard import cupy  # noqa: E402  (skips the module without a GPU)

from shardline.kernels import numpy_ops, sampling_rng  # noqa: E402
from test_kernels_gpu import (  # noqa: E402, F401  (fixtures: ops, rng, poisoned_allocations)
    DTYPES,
    assert_close,
    on_device,
    ops,
    poisoned_allocations,
    random_input,
    random_sampling_params,
    rng,
)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_penalties(ops, rng, dtype):
    rows, vocab = 4, 503
    logits, logits64 = random_input(ops, rng, (rows, vocab), dtype, scale=3.0)
    prompt_lens, output_lens = np.array([5, 1, 9, 0], np.int32), np.array([7, 0, 3, 12], np.int32)
    prompt_ids = rng.integers(0, vocab, size=(rows, 9)).astype(np.int32)
    output_ids = rng.integers(0, 20, size=(rows, 12)).astype(np.int32)  # repeats
    factors = [rng.uniform(0.5, 1.5, rows).astype(np.float32), rng.normal(0, 0.5, rows).astype(np.float32),
               rng.normal(0, 0.3, rows).astype(np.float32)]
    host_args = (prompt_ids, prompt_lens, output_ids, output_lens, *factors)
    out = ops.apply_penalties(logits, *(cupy.asarray(a) for a in host_args))
    assert out.dtype == cupy.float32
    ref = numpy_ops.apply_penalties(logits64.astype(np.float32), *host_args)
    assert_close(ops, out, ref.astype(np.float64), "float32", "apply_penalties")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_is_exact_argmax(ops, rng, dtype):
    # bf16 with few distinct values: many ties, which argmax breaks to the lowest index
    host = rng.integers(-40, 40, size=(64, 32000)) / 8 if dtype == "bfloat16" else rng.standard_normal((64, 32000))
    logits, logits64 = on_device(ops, host, dtype)
    zeros = np.zeros(64, np.float32)
    tokens = ops.sample(logits, zeros, np.zeros(64, np.int32), np.ones(64, np.float32),
                        np.zeros(64, np.uint64), np.zeros(64, np.int64))
    np.testing.assert_array_equal(cupy.asnumpy(tokens), np.argmax(logits64, axis=-1))


# 32000: Llama-2's vocabulary; 128256: Llama-3's (each of a cluster's blocks takes a 16k slice);
# 50257: GPT-2's, not a whole number of 16-byte vectors (the one-logit-at-a-time loop); 5: fewer
# logits than a cluster has blocks
@pytest.mark.parametrize("dtype, batch, vocab", [("float32", 512, 32000), ("bfloat16", 512, 32000),
                                                 ("bfloat16", 128, 128256), ("float16", 128, 128256),
                                                 ("float16", 64, 50257), ("float32", 256, 5)])
def test_seeded_sampling_matches_numpy(ops, rng, dtype, batch, vocab):
    logits, logits64 = random_input(ops, rng, (batch, vocab), dtype, scale=3.0)
    params = random_sampling_params(rng, batch)
    tokens = cupy.asnumpy(ops.sample(logits, **{n: cupy.asarray(p) for n, p in params.items()}))
    expected = numpy_ops.sample(logits64.astype(np.float32), **params)
    agreement = np.mean(tokens == expected)
    assert agreement >= 0.99, f"{dtype}: only {agreement:.3f} of rows agree with numpy_ops.sample"
    filtered_out = []  # rows whose token the reference's filters removed
    for b in np.flatnonzero(params["temperature"] > 0):
        probs = numpy_ops.softmax(logits64[b].astype(np.float32) / params["temperature"][b])
        kept = numpy_ops.filter_probs(probs, int(params["top_k"][b]), float(params["top_p"][b]),
                                      float(params["min_p"][b]))
        if kept[tokens[b]] == 0:
            filtered_out.append(b)
    # top-k alone is exact; a top-p or min-p cut may differ by a last-bit rounding
    assert all(params["top_p"][b] < 1 or params["min_p"][b] > 0 for b in filtered_out), \
        f"top-k violated in rows {filtered_out}"
    assert len(filtered_out) <= 0.01 * batch, f"filtered-out tokens drawn in rows {filtered_out}"


def test_sampling_noise_is_sampling_rng(ops, rng):
    seeds = rng.integers(0, 2**64, size=16, dtype=np.uint64)
    offsets = rng.integers(0, 2**40, size=16).astype(np.int64)
    uniforms = cupy.asnumpy(ops.sampling_uniform(seeds, offsets, 1000))
    for b in range(16):
        np.testing.assert_array_equal(uniforms[b], sampling_rng.uniform(int(seeds[b]), int(offsets[b]), 1000))


def test_sampling_is_batch_independent_and_top_k_1_greedy(ops, rng):
    logits, logits64 = random_input(ops, rng, (7, 503), "float32", scale=2.0)
    params = random_sampling_params(rng, 7)
    params["temperature"][:] = 0.9
    batched = cupy.asnumpy(ops.sample(logits, **params))
    for b in range(7):
        alone = ops.sample(logits[b:b + 1], **{n: p[b:b + 1] for n, p in params.items()})
        assert int(alone[0]) == batched[b]
    params["top_k"][:] = 1
    np.testing.assert_array_equal(cupy.asnumpy(ops.sample(logits, **params)), np.argmax(logits64, axis=-1))


def test_uniform_of_one_never_draws_a_filtered_token(ops):
    # (seed 0, offset 476788) gave u == 1.0 (E = 0) at index 20 with 24-bit
    # uniforms; now u < 1, and filtered tokens score 0 in any case.
    assert float(ops.sampling_uniform([0], [476788], 21)[0, 20]) < 1.0
    logits = cupy.zeros((1, 21), dtype=cupy.float32)
    logits[0, 0] = 5.0
    token = ops.sample(logits, [1.0], [1], [1.0], [0], [476788])
    assert int(token[0]) == 0


def test_sampling_refuses_a_vocabulary_past_its_histograms(ops):
    # a block's low 32-bit histogram sums hold 2^18 logits' weights; one more vector is refused
    vocab = ops._sample_blocks * (1 << 18) + 8
    with pytest.raises(ValueError, match=f"vocabulary of {vocab}"):
        ops.sample(cupy.zeros((1, vocab), dtype=cupy.uint16), [1.0], [0], [1.0], [0], [0])


def test_sampling_launches_the_kernels_cluster(ops):
    # the grid is counted in the cluster width the driver reports for the compiled kernel
    from shardline.kernels.dependent_launch import cluster_width
    width = cluster_width(ops._functions["sample_kernel", "__nv_bfloat16"])
    assert width == ops._sample_blocks
    nvrtc = getattr(cupy.cuda.nvrtc, "getVersion", lambda: (0, 0))()   # CuPy targets sm_90 from NVRTC 11.8
    if int(cupy.cuda.Device().compute_capability) >= 90 and nvrtc >= (11, 8):
        assert width == 8   # sampling.cu's SAMPLE_CLUSTER


_EXPF_STEPS = r"""
extern "C" __global__ void expf_steps(unsigned int first, unsigned int count, unsigned long long* down) {
    // x from the bits first, first + 1, ... (negative floats, rising bits = falling x): is
    // expf(x) ever above expf of the next larger float?
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x) {
        const unsigned int bits = first + i;
        if (expf(__uint_as_float(bits)) > expf(__uint_as_float(bits - 1u))) atomicAdd(down, 1ull);
    }
}
"""


def test_expf_is_non_decreasing_where_sampling_uses_it():
    # sampling.cu's thresholds rest on the probability expf(logit / T - max) / sum being a
    # non-decreasing function of the logit: checked for every float x in [-104, 0) (below, expf is 0)
    expf_steps = cupy.RawKernel(_EXPF_STEPS, "expf_steps")
    first, last = 0x80000001, int(np.float32(-104.0).view(np.uint32))
    down = cupy.zeros(1, dtype=cupy.uint64)
    expf_steps((1024,), (256,), (np.uint32(first), np.uint32(last - first + 1), down))
    assert int(down[0]) == 0, f"expf decreases at {int(down[0])} steps in [-104, 0)"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_top_k_keeps_exactly_the_reference_set_with_signed_zeros_and_ties(ops, rng, dtype):
    # a few distinct values, half of them +-0.0: ties at every threshold, keys of -0.0 below +0.0;
    # top_k from 1 to past the vocabulary (k >= vocab: off). With top_k alone the kept set is the
    # reference's, so every drawn token is one it keeps, and k = 1 draws one of the tied maxima.
    batch, vocab = 64, 4000
    host = rng.choice([-2.0, -0.0, 0.0, 0.0, 1.5, 3.0], size=(batch, vocab))
    logits, logits64 = on_device(ops, host, dtype)
    params = random_sampling_params(rng, batch)
    params["temperature"][:] = 1.0
    params["top_p"][:], params["min_p"][:] = 1.0, 0.0
    params["top_k"] = rng.choice([1, 2, 700, 3999, 4000, 5000], size=batch).astype(np.int32)
    tokens = cupy.asnumpy(ops.sample(logits, **{n: cupy.asarray(p) for n, p in params.items()}))
    for b in range(batch):
        probs = numpy_ops.softmax(logits64[b].astype(np.float32))
        kept = numpy_ops.filter_probs(probs, int(params["top_k"][b]), 1.0)
        assert kept[tokens[b]] > 0, f"row {b} (top_k {params['top_k'][b]}) drew filtered token {tokens[b]}"
        if params["top_k"][b] == 1:
            assert logits64[b, tokens[b]] == logits64[b].max()
