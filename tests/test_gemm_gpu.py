"""CublasGemm's cuBLASLt path (kernels/gemm_lt.py) against the NumPy float64 reference:
tuned bf16/fp16 GEMMs with and without accumulation, a tuned GEMM captured into a CUDA
graph and replayed, a key first met during capture, and the path switched off by
SHARDLINE_GPU_OFF=gemm_autotune. Fresh random inputs each run (the seed is printed);
skipped without CuPy or a GPU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from gpu_guard import cupy  # noqa: F401, E402  (skips the module without a GPU)

from shardline.kernels.gemm import CublasGemm  # noqa: E402
from shardline.kernels.gemm_lt import MAX_TUNED_TOKENS  # noqa: E402
from test_kernels_gpu import (  # noqa: E402, F401  (fixtures: ops, rng, poisoned_allocations)
    assert_close,
    ops,
    poisoned_allocations,
    random_input,
    rng,
)

pytestmark = pytest.mark.gpu


@pytest.fixture
def lt_gemm():
    """A CublasGemm that picks among cuBLASLt's candidates only, so the Lt path runs
    whichever is fastest on this GPU."""
    gemm = CublasGemm(autotune=True)
    assert gemm.tuner is not None, "cuBLASLt did not load (see the warning)"
    gemm.tuner.include_gemm_ex = False
    yield gemm
    gemm.close()


def gemm_inputs(ops, rng, tokens, n, k, dtype):
    """(x, x64, weight, weight64): x [tokens, k], weight [n, k] on the device and in float64."""
    x, x64 = random_input(ops, rng, (tokens, k), dtype)
    w, w64 = random_input(ops, rng, (n, k), dtype, scale=1 / math.sqrt(k))
    return x, x64, w, w64


def lt_choices(gemm) -> list[str]:
    return [record.choice for record in gemm.tuner.records.values()]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("tokens", [1, 2, 16, 64, 256])
@pytest.mark.parametrize("n,k", [(384, 256), (1024, 512)])
def test_tuned_matmul(ops, rng, lt_gemm, dtype, tokens, n, k):
    x, x64, w, w64 = gemm_inputs(ops, rng, tokens, n, k, dtype)
    out = cupy.empty((tokens, n), dtype=x.dtype)
    lt_gemm.matmul_nt(x, w, out)                      # tunes, then runs the choice on `out`
    assert_close(ops, out, x64 @ w64.T, dtype, "tuned")
    again = cupy.empty_like(out)
    lt_gemm.matmul_nt(x, w, again)                    # the cached choice: the same kernel, the same bits
    np.testing.assert_array_equal(cupy.asnumpy(again), cupy.asnumpy(out))

    c, c64 = random_input(ops, rng, (tokens, n), dtype)
    lt_gemm.matmul_nt(x, w, c, accumulate=True)       # tuning must not touch c
    assert_close(ops, c, c64 + x64 @ w64.T, dtype, "tuned, accumulate")
    choices = lt_choices(lt_gemm)
    assert len(choices) == 2 and all(choice.startswith("lt") for choice in choices), choices


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_default_tuner_may_keep_gemm_ex(ops, rng, dtype):
    """With cublasGemmEx among the candidates, whatever wins gives the reference's answer."""
    gemm = CublasGemm(autotune=True)
    try:
        for tokens, n, k in ((16, 1024, 512), (64, 384, 256)):
            x, x64, w, w64 = gemm_inputs(ops, rng, tokens, n, k, dtype)
            out = cupy.empty((tokens, n), dtype=x.dtype)
            gemm.matmul_nt(x, w, out)
            assert_close(ops, out, x64 @ w64.T, dtype, f"T={tokens}")
        assert len(gemm.tuner.records) == 2
    finally:
        gemm.close()


@pytest.mark.parametrize("dtype,tokens", [("float32", 16), ("bfloat16", MAX_TUNED_TOKENS * 2), ("float16", 200)])
def test_untuned_calls_run_gemm_ex(ops, rng, lt_gemm, dtype, tokens):
    """fp32, inputs longer than decode batches and token counts other than the graph buckets'
    powers of two keep cublasGemmEx, untimed."""
    x, x64, w, w64 = gemm_inputs(ops, rng, tokens, 384, 256, dtype)
    out = cupy.empty((tokens, 384), dtype=x.dtype)
    lt_gemm.matmul_nt(x, w, out)
    assert_close(ops, out, x64 @ w64.T, dtype, "gemm_ex")
    assert not lt_gemm.tuner.records


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_tuned_gemm_in_cuda_graph(ops, rng, lt_gemm, dtype):
    """A tuned GEMM captured into a graph replays to the eager answer and follows new
    inputs; a key first met during capture runs cublasGemmEx there and is not tuned."""
    tokens, n, k = 16, 1024, 512
    x, x64, w, w64 = gemm_inputs(ops, rng, tokens, n, k, dtype)
    x_new, x_new64 = random_input(ops, rng, (tokens, k), dtype)
    y, y64 = random_input(ops, rng, (2 * tokens, k), dtype)    # a key the tuner has not seen
    out = cupy.empty((tokens, n), dtype=x.dtype)
    out_y = cupy.empty((2 * tokens, n), dtype=x.dtype)
    stream = cupy.cuda.Stream()
    with stream:
        lt_gemm.matmul_nt(x, w, out)                  # eager: tunes the key
        eager = cupy.asnumpy(out, stream=stream)
        assert len(lt_gemm.tuner.records) == 1
        stream.begin_capture()
        try:
            lt_gemm.matmul_nt(x, w, out)
            lt_gemm.matmul_nt(y, w, out_y)
        finally:
            graph = stream.end_capture()
        assert len(lt_gemm.tuner.records) == 1, "tuned during capture"
        out.fill(0)
        graph.launch(stream=stream)
        stream.synchronize()
        np.testing.assert_array_equal(cupy.asnumpy(out), eager)
        assert_close(ops, out_y, y64 @ w64.T, dtype, "first met in capture")
        x[...] = x_new
        graph.launch(stream=stream)
        stream.synchronize()
    assert_close(ops, out, x_new64 @ w64.T, dtype, "replay with new x")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_switched_off_gives_same_answer(ops, rng, lt_gemm, dtype, monkeypatch):
    monkeypatch.setenv("SHARDLINE_GPU_OFF", "gemm_autotune")
    plain = CublasGemm()
    try:
        assert plain.tuner is None
        tokens, n, k = 64, 1024, 512
        x, x64, w, w64 = gemm_inputs(ops, rng, tokens, n, k, dtype)
        tuned_out, plain_out = (cupy.empty((tokens, n), dtype=x.dtype) for _ in range(2))
        lt_gemm.matmul_nt(x, w, tuned_out)
        plain.matmul_nt(x, w, plain_out)
        ref = x64 @ w64.T
        assert_close(ops, tuned_out, ref, dtype, "tuned")
        assert_close(ops, plain_out, ref, dtype, "switched off")
        assert_close(ops, tuned_out, ops.to_host(plain_out).astype(np.float64), dtype, "tuned vs off")
    finally:
        plain.close()


def test_timer_spin_holds_the_stream_for_its_cycles():
    """The timer's lead (_spin) keeps the stream busy for at least its cycles at the SM's top
    clock, so the reps queued after it wait behind it; and the spin ends."""
    from shardline.kernels.gemm_lt import LEAD_CYCLES, _spin
    stream = cupy.cuda.get_current_stream()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record(stream)
    _spin(LEAD_CYCLES, stream)
    end.record(stream)
    assert not end.done, "the stream ran past the spin at once"
    end.synchronize()
    top_hz = cupy.cuda.Device().attributes["ClockRate"] * 1e3
    assert cupy.cuda.get_elapsed_time(start, end) / 1e3 >= 0.9 * LEAD_CYCLES / top_hz
