"""cuBLASLt GEMMs with the algorithm measured per shape, for decode-sized token counts.

A decode GEMM reads a whole weight for a few tokens, so its speed is the
bandwidth it reaches. cuBLAS's default pick (cublasGemmEx) leaves a fifth of
it unused on some Llama shapes and splits K with a separate reduction kernel
on others. `LtAutotuner` does what TensorRT-LLM's GEMM profiler does: the
first time a key (tokens, N, K, dtype, accumulate, pointer alignments) comes
on a stream that is not capturing, it times cuBLASLt's heuristic candidates
and plain cublasGemmEx on a scratch output (CUDA events; the L2 flushed
before each rep, so the weight comes from HBM as it does in a decode step)
and keeps the fastest, with its descriptors, for every later call, captured
ones included.

It must not time, allocate or build descriptors while the stream captures (a
key first met there runs cublasGemmEx and is tuned at its next eager call),
must not write the caller's output while timing, and must not raise for a
shape cuBLASLt cannot do: such a key runs cublasGemmEx, with one warning.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable

import cupy
import numpy as np
from nvmath import CudaDataType
from nvmath.bindings import cublas
from nvmath.bindings import cublasLt as lt

from shardline.kernels.backend import gpu_paths_off

log = logging.getLogger(__name__)

# Longer inputs (prefill chunks) are compute bound, where cuBLAS's pick is good. Only token
# counts that are powers of two are tuned (the CUDA-graph buckets of decode steps): eager mixed
# steps come in every size, and timing each would stall them.
MAX_TUNED_TOKENS = 256
MAX_CANDIDATES = 16
# Split-K candidates must add their parts in fp32 (as gemm_ex's splitKreduce does), not in the
# output's bf16/fp16 (INPLACE, OUTPUT_TYPE), so the answer keeps a single rounding.
FP32_REDUCTIONS = (lt.ReductionScheme.NONE, lt.ReductionScheme.COMPUTE_TYPE)
WARMUP_REPS, TIMED_REPS = 3, 10
# The GPU spins this many clocks (about 1 ms) before the timed reps, so that the host has queued
# them all when they run: without it a rep of a short kernel timed the host's launch too (session
# 32: a 1x4096x4096 skinny GEMM timed 14.5-50 us from one round to the next, the clocks steady).
LEAD_CYCLES = 2_000_000

GemmEx = Callable[[Any, Any, Any, bool], None]   # (x, weight, out, accumulate) -> None

_A, _PREF = lt.MatmulDescAttribute, lt.MatmulPreferenceAttribute
_CONFIG = lt.MatmulAlgoConfigAttribute
_DESCRIBED = (("algo", _CONFIG.ID), ("tile", _CONFIG.TILE_ID), ("stages", _CONFIG.STAGES_ID),
              ("splitK", _CONFIG.SPLITK_NUM), ("reduction", _CONFIG.REDUCTION_SCHEME),
              ("swizzle", _CONFIG.CTA_SWIZZLING))


@dataclass(frozen=True)
class TuneRecord:
    """What tuning one key measured: median microseconds of one call."""

    choice: str              # "gemm_ex", or "lt algo <id> tile <id> ..." for a cuBLASLt algorithm
    choice_us: float
    gemm_ex_us: float
    num_candidates: int      # cuBLASLt candidates that ran


@dataclass
class _LtPlan:
    """One key's cuBLASLt descriptors, in the column-major view gemm_ex uses:
    out^T [N, T] = op_T(weight [K, N]) @ x^T [K, T]."""

    desc: int = 0
    a_layout: int = 0        # weight: [K, N] column-major, ld K (transposed by the op)
    b_layout: int = 0        # x^T: [K, T], ld K
    c_layout: int = 0        # out^T: [N, T], ld N; C and D both
    algo: np.ndarray | None = None   # [1] of lt.matmul_algo_dtype, once tuned

    def destroy(self) -> None:
        for layout in (self.a_layout, self.b_layout, self.c_layout):
            if layout:
                lt.matrix_layout_destroy(layout)
        if self.desc:
            lt.matmul_desc_destroy(self.desc)
        self.desc = self.a_layout = self.b_layout = self.c_layout = 0


class LtAutotuner:
    def __init__(self, workspace):
        self._handle = lt.create()
        self._workspace = workspace          # shared with the cuBLAS handle: one stream uses both in order
        self._one = np.ones(1, dtype=np.float32)   # host scalars, baked into captured kernels
        self._zero = np.zeros(1, dtype=np.float32)
        self._plans: dict[tuple, _LtPlan] = {}      # tuned keys whose cuBLASLt algorithm won
        self._gemm_ex_keys: set[tuple] = set()       # tuned keys where cublasGemmEx won, or cuBLASLt failed
        self._l2_bytes = cupy.cuda.Device().attributes["L2CacheSize"]
        self.records: dict[tuple, TuneRecord] = {}
        self.include_gemm_ex = True   # False: pick among cuBLASLt's candidates only (tests, benchmarks)

    def matmul(self, x, weight, out, accumulate: bool, data_type: int, gemm_ex: GemmEx) -> bool:
        """out[T, N] = x[T, K] @ weight[N, K]^T (+ out) through the key's cuBLASLt algorithm,
        tuning it first when it is new; False where the caller must run cublasGemmEx."""
        num_tokens = x.shape[0]
        if not 1 <= num_tokens <= MAX_TUNED_TOKENS or num_tokens & (num_tokens - 1):
            return False
        key = (num_tokens, weight.shape[0], x.shape[1], data_type, accumulate,
               _alignment_bytes(weight.data.ptr), _alignment_bytes(x.data.ptr), _alignment_bytes(out.data.ptr))
        plan = self._plans.get(key)
        if plan is None:
            if key in self._gemm_ex_keys or _capturing():
                return False
            plan = self._tune(key, x, weight, accumulate, data_type, gemm_ex)
            if plan is None:
                return False
        try:
            self._launch(plan, plan.algo, x, weight, out, accumulate)
        except Exception as err:   # a status error: nothing was queued, so gemm_ex can still run
            self._give_up(key, err)
            return False
        return True

    def _tune(self, key: tuple, x, weight, accumulate: bool, data_type: int, gemm_ex: GemmEx) -> _LtPlan | None:
        """The key's plan with its fastest algorithm; None where cublasGemmEx won or cuBLASLt failed."""
        num_tokens, n, k = key[:3]
        try:
            plan = self._plans[key] = _create_plan(data_type, num_tokens, n, k)
            algos = self._candidates(plan, key[5:])
            record, plan.algo = self._measure(plan, algos, x, weight, accumulate, gemm_ex)
        except Exception as err:
            self._give_up(key, err)
            return None
        self.records[key] = record
        log.info("GEMM T=%d N=%d K=%d %s%s: %s %.1f us (gemm_ex %.1f us, %d candidates)", num_tokens, n, k,
                 CudaDataType(data_type).name, " accumulate" if accumulate else "", record.choice, record.choice_us,
                 record.gemm_ex_us, record.num_candidates)
        if plan.algo is None:
            self._plans.pop(key).destroy()
            self._gemm_ex_keys.add(key)
            return None
        return plan

    def _candidates(self, plan: _LtPlan, alignments: tuple[int, int, int]) -> list[np.ndarray]:
        """cuBLASLt's heuristic picks for the plan (best first), within the workspace and the
        pointers' alignments."""
        weight_align, x_align, out_align = alignments
        pref = lt.matmul_preference_create()
        try:
            set_pref = functools.partial(_set, lt.matmul_preference_set_attribute,
                                         lt.get_matmul_preference_attribute_dtype, pref)
            set_pref(_PREF.MAX_WORKSPACE_BYTES, self._workspace.nbytes)
            set_pref(_PREF.MIN_ALIGNMENT_A_BYTES, weight_align)
            set_pref(_PREF.MIN_ALIGNMENT_B_BYTES, x_align)
            set_pref(_PREF.MIN_ALIGNMENT_C_BYTES, out_align)
            set_pref(_PREF.MIN_ALIGNMENT_D_BYTES, out_align)
            results = np.zeros(MAX_CANDIDATES, dtype=lt.matmul_heuristic_result_dtype)
            count = np.zeros(1, dtype=np.int32)
            lt.matmul_algo_get_heuristic(self._handle, plan.desc, plan.a_layout, plan.b_layout, plan.c_layout,
                                         plan.c_layout, pref, MAX_CANDIDATES, results.ctypes.data, count.ctypes.data)
        finally:
            lt.matmul_preference_destroy(pref)
        results = results[:int(count[0])]
        results = results[(results["state"] == 0) & (results["workspace_size"] <= self._workspace.nbytes)]
        algos = [results["algo"][i:i + 1].copy() for i in range(len(results))]
        return [a for a in algos if _config(a, _CONFIG.SPLITK_NUM) <= 1
                or _config(a, _CONFIG.REDUCTION_SCHEME) in FP32_REDUCTIONS]

    def _measure(self, plan: _LtPlan, algos: list[np.ndarray], x, weight, accumulate: bool,
                 gemm_ex: GemmEx) -> tuple[TuneRecord, np.ndarray | None]:
        """(what was measured, the fastest algorithm or None for cublasGemmEx), on a scratch output."""
        timer = _Timer(weight.nbytes, self._l2_bytes)
        with cupy.cuda.using_allocator(cupy.get_default_memory_pool().malloc):   # not a graph's pool
            scratch = cupy.zeros((x.shape[0], weight.shape[0]), dtype=x.dtype)   # [T, N]
        gemm_ex_s = timer.median_s(functools.partial(gemm_ex, x, weight, scratch, accumulate))
        timed = []
        for algo in algos:
            run = functools.partial(self._launch, plan, algo, x, weight, scratch, accumulate)
            try:
                timed.append((timer.median_s(run), len(timed), algo))
            except lt.cuBLASLtError:   # refused at launch: not a candidate after all
                continue
        if not timed:
            raise RuntimeError(f"none of cuBLASLt's {len(algos)} candidates ran")
        best_s, _, best = min(timed, key=lambda t: t[:2])
        if self.include_gemm_ex and gemm_ex_s <= best_s:
            return TuneRecord("gemm_ex", gemm_ex_s * 1e6, gemm_ex_s * 1e6, len(timed)), None
        return TuneRecord(_describe(best), best_s * 1e6, gemm_ex_s * 1e6, len(timed)), best

    def _launch(self, plan: _LtPlan, algo: np.ndarray, x, weight, out, accumulate: bool) -> None:
        beta = self._one if accumulate else self._zero
        lt.matmul(self._handle, plan.desc, self._one.ctypes.data,
                  weight.data.ptr, plan.a_layout, x.data.ptr, plan.b_layout,
                  beta.ctypes.data, out.data.ptr, plan.c_layout, out.data.ptr, plan.c_layout,
                  algo.ctypes.data, self._workspace.data.ptr, self._workspace.nbytes,
                  cupy.cuda.get_current_stream().ptr)

    def _give_up(self, key: tuple, err: Exception) -> None:
        log.warning("cuBLASLt GEMM T=%d N=%d K=%d %s failed, it runs cublasGemmEx: %s: %s",
                    *key[:3], CudaDataType(key[3]).name, type(err).__name__, err)
        plan = self._plans.pop(key, None)
        if plan is not None:
            plan.destroy()
        self._gemm_ex_keys.add(key)

    def close(self) -> None:
        for plan in self._plans.values():
            plan.destroy()
        self._plans.clear()
        if self._handle:
            lt.destroy(self._handle)
            self._handle = 0


@functools.cache
def _spin_kernel() -> cupy.RawKernel:
    return cupy.RawKernel(r"""
extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) {}
}""", "spin")


def _spin(cycles: int, stream) -> None:
    """Keeps the GPU busy for `cycles` SM clocks on `stream`: the calls queued after it run back to
    back however slowly the host launches them."""
    _spin_kernel()((1,), (1,), (np.int64(cycles),), stream=stream)


class _Timer:
    """Median GPU time of a call on the current stream over TIMED_REPS reps (after
    WARMUP_REPS), the L2 flushed before each rep when the weight would stay in it, the reps
    queued behind a spin of LEAD_CYCLES so that none waits on the host (SHARDLINE_GPU_OFF=
    timer_lead: not, for A/B runs).

    The flush reads a buffer twice the L2's size (`read_flush`). A memset as the flush left the
    L2 full of dirty lines, whose write-back the timed call then paid: 5-16 us more than the
    same GEMMs take inside a decode step (session 31), enough to reorder close candidates.
    SHARDLINE_GPU_OFF=read_flush brings the memset back (A/B runs)."""

    def __init__(self, weight_bytes: int, l2_bytes: int):
        off = gpu_paths_off()
        self.read_flush, self.lead = "read_flush" not in off, "timer_lead" not in off
        self._stream = cupy.cuda.get_current_stream()
        self._events = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(TIMED_REPS)]
        self._flush = self._flush_sum = None
        if weight_bytes < 2 * l2_bytes:
            try:
                with cupy.cuda.using_allocator(cupy.get_default_memory_pool().malloc):
                    self._flush = cupy.zeros(2 * l2_bytes // 8, dtype=cupy.uint64)
                    self._flush_sum = cupy.zeros((), dtype=cupy.uint64)
            except cupy.cuda.memory.OutOfMemoryError:
                log.info("no memory to flush the L2 while timing GEMMs: small weights are timed from L2")

    def _flush_l2(self) -> None:
        if self._flush is None:
            return
        if self.read_flush:
            cupy.sum(self._flush, out=self._flush_sum)
        else:
            cupy.cuda.runtime.memsetAsync(self._flush.data.ptr, 0, self._flush.nbytes, self._stream.ptr)

    def median_s(self, run: Callable[[], None]) -> float:
        for _ in range(WARMUP_REPS):
            run()
        if self.lead:
            _spin(LEAD_CYCLES, self._stream)   # the reps queue up behind it: no launch gaps in the timed spans
        for start, end in self._events:
            self._flush_l2()
            start.record(self._stream)
            run()
            end.record(self._stream)
        self._events[-1][1].synchronize()
        return float(np.median([cupy.cuda.get_elapsed_time(s, e) for s, e in self._events])) / 1e3


def _create_plan(data_type: int, num_tokens: int, n: int, k: int) -> _LtPlan:
    plan = _LtPlan()
    try:
        plan.desc = lt.matmul_desc_create(cublas.ComputeType.COMPUTE_32F, CudaDataType.CUDA_R_32F)
        set_desc = functools.partial(_set, lt.matmul_desc_set_attribute, lt.get_matmul_desc_attribute_dtype,
                                     plan.desc)
        set_desc(_A.TRANSA, cublas.Operation.T)
        set_desc(_A.TRANSB, cublas.Operation.N)
        plan.a_layout = lt.matrix_layout_create(data_type, k, n, k)
        plan.b_layout = lt.matrix_layout_create(data_type, k, num_tokens, k)
        plan.c_layout = lt.matrix_layout_create(data_type, n, num_tokens, n)
    except Exception:
        plan.destroy()
        raise
    return plan


def _set(setter, dtype_of, obj: int, attribute, value) -> None:
    """One descriptor attribute, in the C type nvmath's table gives for it (int32 for
    TRANSA, uint64 for MAX_WORKSPACE_BYTES, uint32 for the alignments)."""
    buf = np.array([int(value)], dtype=dtype_of(attribute))
    setter(obj, attribute, buf.ctypes.data, buf.itemsize)


def _config(algo: np.ndarray, attribute) -> int:
    """One configuration value of an algorithm (its id, tile, split-K parts, ...)."""
    buf = np.zeros(1, dtype=lt.get_matmul_algo_config_attribute_dtype(attribute))
    written = np.zeros(1, dtype=np.uint64)
    lt.matmul_algo_config_get_attribute(algo.ctypes.data, attribute, buf.ctypes.data, buf.itemsize,
                                        written.ctypes.data)
    return int(buf[0])


def _describe(algo: np.ndarray) -> str:
    """"lt algo 21 tile 18 stages 9 splitK 1 ...": the algorithm's configuration, for logs."""
    return " ".join(["lt"] + [f"{name} {_config(algo, attribute)}" for name, attribute in _DESCRIBED])


def _alignment_bytes(ptr: int) -> int:
    """The largest power of two (up to 256) dividing an address: what a kernel may assume of it."""
    return min(256, ptr & -ptr) if ptr else 256


def _capturing() -> bool:
    """Whether the current stream captures. One whose status cannot be read (the legacy
    stream while another stream captures) counts as capturing."""
    try:
        return bool(cupy.cuda.get_current_stream().is_capturing())
    except Exception:
        return True
