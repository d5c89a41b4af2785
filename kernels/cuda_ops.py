"""CUDA kernels: every op of numpy_ops.py, same names and meaning, on cupy arrays.

Arrays are in the storage dtype (bf16 as uint16 bit patterns, float16 or
float32) and every kernel accumulates in float32. The CUDA C++ lives in the
`*.cu` files beside this one (compiled once per process with NVRTC through
cupy.RawModule, `common.cu` prepended to each, and `flash_common.cu` to the
flash kernels' files; flash_prefill_sm90.cu for sm_90a alone, by NVRTC directly);
GEMMs go through cuBLAS in gemm.py (cuBLASLt, with an algorithm measured per
shape, for decode-sized inputs: gemm_lt.py). The
attention, KV-cache, sampling and decode-sized GEMM ops are mixins in
cuda_attention.py, cuda_cache.py, cuda_sampling.py and cuda_skinny.py. Shapes are
checked here, on the host, before any launch.

Nothing here synchronises with the host, sorts on the host or reads device
values to decide shapes, so a decode step built from these ops can be
captured into a CUDA graph (given its inputs already live on the device
with the index dtypes named in each docstring; others are converted, which
costs a copy). This module must not hold model state or choose dtypes for
its callers.
"""

from __future__ import annotations

import contextlib
import math

import cupy
import numpy as np

from shardline.kernels.cuda_common import (
    _FLASH_COUNTERS,
    _MAX_EXPERTS,
    _MAX_GRID_Y,
    _NORM_VECS,
    _SAMPLE_CLUSTER,
    _STORAGE_DTYPES,
    _THREADS,
    _as,
    _compile_kernels,
    _ctype,
    _grid_1d,
    _in_place,
    _index,
    _norm_vec_threads,
    _rms_args,
    _rms_rows,
    _row_threads,
    _row_word,
    _rows,
    _same_dtype,
    _vectors,
    bf16_bits,
)
from shardline.kernels import numpy_ops
from shardline.kernels.backend import gpu_paths_off
from shardline.kernels.cuda_attention import AttentionOps
from shardline.kernels.cuda_cache import CacheOps
from shardline.kernels.cuda_sampling import SamplingOps
from shardline.kernels.cuda_skinny import SkinnyGemmOps, few_rows_blocks_per_sm, skinny_large_bytes_for
from shardline.kernels.dependent_launch import cluster_width, launch_dependent
from shardline.kernels.gemm_lt import _capturing
from shardline.kernels.gemm import CublasGemm
from shardline.kernels.staging import Uploader


class CudaOps(AttentionOps, CacheOps, SamplingOps, SkinnyGemmOps):
    name = "cuda"
    use_dependent_launch = "dependent_launch" not in gpu_paths_off()
    # Projections before a norm summed into the residual stream by their GEMM (linear_add,
    # models/layers.py's RowParallelLinear.add_to); off: the add fused into the norm.
    residual_in_gemm = "residual_in_gemm" not in gpu_paths_off()

    def __init__(self, device_id: int = 0):
        self.device_id = device_id
        with cupy.cuda.Device(device_id):
            self._functions = _compile_kernels()
            self._gemm = CublasGemm()
            self._skinny_splits: dict[tuple, int] = {}
            self._residency: dict[tuple, int] = {}   # (kernel, template) -> blocks an SM
            self._zero_i32 = cupy.zeros(1, dtype=cupy.int32)  # the one-block table of a contiguous k, v
            # flash_attention.cu's split counters: zero between launches (the last split resets its own)
            self._flash_counters = cupy.zeros(_FLASH_COUNTERS, dtype=cupy.int32)
            self._multiprocessors = cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]
            # sampling.cu's blocks a row: its cluster width, SAMPLE_CLUSTER where NVRTC built it for
            # sm_90 or later (CuPy may target an older architecture than the device's)
            self._sample_blocks = cluster_width(self._functions["sample_kernel", "__nv_bfloat16"])
            if self._sample_blocks is None:   # the driver did not say: the device's architecture
                sm_90 = int(cupy.cuda.Device(device_id).compute_capability) >= 90
                self._sample_blocks = _SAMPLE_CLUSTER if sm_90 else 1
            name = cupy.cuda.runtime.getDeviceProperties(device_id)["name"]
            self.device_name = name.decode() if isinstance(name, bytes) else name
            self.skinny_blocks_per_sm_few_rows = few_rows_blocks_per_sm(self.device_name)
            self.skinny_large_bytes = skinny_large_bytes_for(self.device_name)
            self._allow_flash_shared_memory()
        self._pointer_tables: dict[tuple, cupy.ndarray] = {}
        self._uploader = Uploader()
        self._dependent = False
        self._shared_carveout: int | None = None

    @property
    def shared_carveout(self) -> int | None:
        """The shared-memory share of L1 (0-100 %) every kernel of ours asks for; None: the
        driver's choice for each. An SM runs blocks of one carveout at a time, so a kernel
        wanting more shared memory than the one before waits for SMs to drain (flash_decode
        after the skinny GEMMs); for A/B runs (bench.decode_ab, bench.step_parts). All at 100
        made Llama-3-8B's synthetic batch-1 step 5.85 -> 6.37 ms: the skinny GEMM needs L1. In
        the engine, 50 with 102 KiB decode tiles (16x3x4) or 33 with 16x2x4 took 6.15 ms
        against 5.89 (the tile alone 5.94), so the driver's choice stays."""
        return self._shared_carveout

    @shared_carveout.setter
    def shared_carveout(self, percent: int | None) -> None:
        if percent is not None and not 0 <= percent <= 100:
            raise ValueError(f"shared_carveout must be None or 0-100 (%), got {percent!r}")
        with cupy.cuda.Device(self.device_id):
            for function in self._functions.values():
                function.preferred_shared_memory_carveout = -1 if percent is None else percent
        self._shared_carveout = percent
        self._residency.clear()   # blocks an SM may depend on the carveout

    @staticmethod
    def capturing() -> bool:
        """numpy_ops.capturing: whether this thread's current stream is capturing a graph."""
        return _capturing()

    @contextlib.contextmanager
    def dependent_launches(self):
        """Kernels launched inside may start while the kernel before them finishes
        (dependent_launch.py). For graph capture: each launch costs more host time."""
        before, self._dependent = self._dependent, self.use_dependent_launch
        try:
            yield
        finally:
            self._dependent = before

    def _launch(self, kernel: str, ctype, grid, block, args, shared_mem: int = 0) -> None:
        if 0 in grid:
            return  # empty input: nothing to launch (a 0-sized grid is a launch error)
        if self._dependent:
            launch_dependent(self._functions[kernel, ctype], grid, block, args, shared_mem)
            return
        # cupy raises CUDADriverError when the launch itself fails.
        self._functions[kernel, ctype](grid, block, args, shared_mem=shared_mem)

    # -- host <-> device -------------------------------------------------

    def from_float(self, host: np.ndarray, dtype: str):
        if dtype not in _STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_STORAGE_DTYPES)}, got {dtype!r}")
        device32 = cupy.asarray(np.ascontiguousarray(host, dtype=np.float32))
        if dtype == "bfloat16":
            return bf16_bits(device32)  # rounded on the device: weights are GBs
        return device32.astype(_STORAGE_DTYPES[dtype])

    def upload(self, arrays: dict[str, np.ndarray]) -> dict:
        """Host arrays -> fresh device arrays of the same dtypes and shapes, in one
        asynchronous copy on the current stream (kernels/staging.py)."""
        return self._uploader(arrays)

    def to_host(self, arr) -> np.ndarray:
        host = cupy.asnumpy(arr)
        if host.dtype == np.uint16:  # bf16 bit patterns
            return (host.astype(np.uint32) << 16).view(np.float32)
        if np.issubdtype(host.dtype, np.floating):
            return host.astype(np.float32)
        return host

    # -- rows and the KV cache -------------------------------------------

    def _gather_rows(self, src, rows):
        src, flat_rows = cupy.ascontiguousarray(src), _index(rows)
        out = cupy.empty((flat_rows.size,) + src.shape[1:], dtype=src.dtype)
        word, row_words = _row_word(math.prod(src.shape[1:]) * src.itemsize)
        self._launch("gather_rows_kernel", word, (flat_rows.size,), (_THREADS,),
                     (src, out, flat_rows, np.int64(src.shape[0]), np.int64(row_words)))
        return out.reshape(tuple(np.shape(rows)) + src.shape[1:])

    def embedding(self, weight, ids):
        # weight [vocab, hidden], ids [num_tokens] -> [num_tokens, hidden];
        # out-of-range ids give zero rows (checking would need a host sync)
        return self._gather_rows(weight, ids)

    def vocab_embedding(self, weight, ids, start: int):
        # the gather kernel already writes zero rows for ids outside the table
        return self.embedding(weight, _index(ids) - np.int64(start))

    def index_rows(self, x, rows):
        # x [n, ...] of any dtype, rows [m] -> [m, ...]
        return self._gather_rows(x, rows)

    def scatter_add_rows(self, out, rows, src, scale) -> None:
        """out[rows[i]] += scale[i] * src[i], in place (rows may repeat; scale float32)."""
        _in_place(out)
        ctype = _ctype(out, "out")
        src, rows, scale = cupy.ascontiguousarray(src), _index(rows), _as(scale, cupy.float32).ravel()
        _same_dtype(out, src)
        if src.shape[1:] != out.shape[1:] or src.shape[0] != rows.size or scale.size != rows.size:
            raise ValueError(f"scatter_add_rows shapes: out {out.shape}, rows {rows.shape}, "
                             f"src {src.shape}, scale {scale.shape}")
        hidden = math.prod(out.shape[1:])
        self._launch("scatter_add_rows_kernel", ctype, (rows.size,), _row_threads(hidden),
                     (out, rows, src, scale, np.int64(out.shape[0]), np.int32(hidden)))

    # -- GEMM and elementwise ---------------------------------------------

    def linear(self, x, weight, bias=None):
        # x [..., in], weight [out, in] (torch layout), bias [out] -> [..., out]
        x, weight, x2 = self._linear_inputs(x, weight, "linear")
        num_out = weight.shape[0]
        out = cupy.empty((x2.shape[0], num_out), dtype=x.dtype)
        if bias is not None:
            bias = cupy.ascontiguousarray(bias)
            _same_dtype(x, bias)
            if bias.shape != (num_out,):
                raise ValueError(f"linear: bias {bias.shape} must be ({num_out},)")
            self._fill_rows(out, bias)
        if not self._matmul_into(x2, weight, out, accumulate=bias is not None) and bias is None:
            out.fill(0)  # an empty sum
        return out.reshape(x.shape[:-1] + (num_out,))

    def linear_add(self, x, weight, residual):
        """numpy_ops.linear_add, summed by the GEMM (beta = 1) into residual's memory: the norm
        after it then reads one array instead of the projection and the residual."""
        x, weight, x2 = self._linear_inputs(x, weight, "linear_add")
        numpy_ops.check_linear_add(x, weight, residual)
        self._matmul_into(x2, weight, residual.reshape(x2.shape[0], weight.shape[0]), accumulate=True)
        return residual

    @staticmethod
    def _linear_inputs(x, weight, op: str):
        """(x, weight, x as [T, in]), contiguous and checked."""
        x, weight = cupy.ascontiguousarray(x), cupy.ascontiguousarray(weight)
        _ctype(x, "x")   # a storage dtype
        _same_dtype(x, weight)
        if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
            raise ValueError(f"{op}: x {x.shape} does not match weight {weight.shape} ([out, in])")
        return x, weight, x.reshape(-1, x.shape[-1])

    def _matmul_into(self, x2, weight, out, accumulate: bool) -> bool:
        """out [T, N] = x2 [T, K] @ weight^T (+ out); False where the product is empty (no launch)."""
        if not (out.size and x2.shape[1]):
            return False
        if self._skinny_applies(x2, weight):
            self._skinny(x2, weight, out, accumulate=accumulate)
        else:
            self._gemm.matmul_nt(x2, weight, out, accumulate=accumulate)
        return True

    def sums_into_residual(self, x, weight) -> bool:
        """numpy_ops.sums_into_residual: with residual_in_gemm on, for the GEMMs cuBLAS runs.
        Not the skinny kernel's, whose epilogue would wait on loading the residual: Llama-3-8B's
        batch-1 step on an H200 took 4.69-4.71 ms so against 4.58-4.60 (bench.decode_ab)."""
        return self.residual_in_gemm and not self._skinny_applies(x.reshape(-1, x.shape[-1]), weight)

    def _fill_rows(self, out, row) -> None:
        """Every row of out [T, N] set to row [N] (a bias the GEMM then accumulates onto)."""
        self._launch("fill_rows_kernel", _ctype(out, "out"), _grid_1d(out.size), (_THREADS,),
                     (row, out, np.int64(out.shape[0]), np.int32(out.shape[1])))

    def gated_linear(self, x, weight, bias=None):
        """silu_and_mul(linear(x, weight, bias)): weight [2 * inter, in] holds the gate rows then
        the up rows. Decode-sized inputs without a bias run one skinny GEMM whose warps apply
        the gate (the same roundings as the two ops, one launch fewer)."""
        x, weight = cupy.ascontiguousarray(x), cupy.ascontiguousarray(weight)
        x2 = x.reshape(-1, x.shape[-1])  # [T, in]
        if bias is not None or weight.ndim != 2 or weight.shape[0] % 2 or x.shape[-1] != weight.shape[1] \
                or x.dtype != weight.dtype or not x2.size or not self._skinny_applies(x2, weight):
            return self.silu_and_mul(self.linear(x, weight, bias))
        out = cupy.empty((x2.shape[0], weight.shape[0] // 2), dtype=x.dtype)
        self._skinny(x2, weight, out, gated=True)
        return out.reshape(x.shape[:-1] + (out.shape[1],))

    def add(self, a, b):
        # b may repeat along a's leading dimensions (e.g. a bias row)
        a, b = cupy.ascontiguousarray(a), cupy.ascontiguousarray(b)
        ctype = _ctype(a, "a")
        _same_dtype(a, b)
        if b.ndim > a.ndim or a.shape[a.ndim - b.ndim:] != b.shape:
            raise ValueError(f"add: b {b.shape} does not broadcast onto a {a.shape}")
        out = cupy.empty_like(a)
        self._launch("add_kernel", ctype, _grid_1d(a.size if b.size else 0), (_THREADS,),
                     (a, b, out, np.int64(a.size), np.int64(b.size)))
        return out

    def silu_and_mul(self, x, rms_of=None, eps: float = 0.0):
        """x [..., 2 * inter]: gate then up -> [..., inter]. rms_of [rows, hidden]: gate and up
        times 1 / rms of its rows first (numpy_ops.silu_and_mul), for 16-bit x in 16-byte vectors."""
        x = cupy.ascontiguousarray(x)
        ctype = _ctype(x, "x")
        if x.shape[-1] % 2:
            raise ValueError(f"silu_and_mul: last dimension {x.shape[-1]} must be even (gate | up)")
        inter = x.shape[-1] // 2
        out = cupy.empty(x.shape[:-1] + (inter,), dtype=x.dtype)
        rms = _rms_rows(rms_of, x.reshape(-1, x.shape[-1]))
        vec = _vectors(inter, x, out) and (rms is None or _vectors(rms.shape[1], rms))
        if rms is not None and not vec:
            raise ValueError(f"silu_and_mul: rms_of needs 16-bit rows in 16-byte vectors (inter {inter}, hidden "
                             f"{rms.shape[1]})")
        kernel, columns = ("silu_and_mul_vec_kernel", inter // 8) if vec else ("silu_and_mul_kernel", inter)
        args = (x, out, np.int32(inter))
        if rms is not None:
            kernel, args = "silu_and_mul_rms_vec_kernel", args + _rms_args(rms, eps)
        self._launch(kernel, ctype, (_rows(x), min(-(-columns // _THREADS), _MAX_GRID_Y)), (_THREADS,), args)
        return out

    def gelu(self, x, approximate: str = "tanh"):
        if approximate not in ("tanh", "none"):
            raise ValueError(f"gelu approximate must be 'tanh' or 'none', got {approximate!r}")
        x = cupy.ascontiguousarray(x)
        out = cupy.empty_like(x)
        self._launch("gelu_kernel", _ctype(x, "x"), _grid_1d(x.size), (_THREADS,),
                     (x, out, np.int64(x.size), np.int32(approximate == "none")))
        return out

    def _check_rope(self, q, k, positions, cos_sin, contiguous: bool = True):
        if contiguous:
            q, k = cupy.ascontiguousarray(q), cupy.ascontiguousarray(k)
        positions = _index(positions)
        cos_sin = _as(cos_sin, cupy.float32)
        _ctype(q, "q")
        _same_dtype(q, k)
        head_dim = q.shape[-1]
        if q.ndim != 3 or k.ndim != 3 or k.shape[0] != q.shape[0] or k.shape[2] != head_dim:
            raise ValueError(f"rope: q {q.shape} and k {k.shape} must be [T, heads, head_dim]")
        if positions.size != q.shape[0] or cos_sin.ndim != 2 or cos_sin.shape[1] != head_dim or head_dim % 2:
            raise ValueError(f"rope: positions {positions.shape} / cos_sin {cos_sin.shape} do not fit "
                             f"{q.shape[0]} tokens of even head_dim {head_dim}")
        return q, k, positions, cos_sin

    def rope(self, q, k, positions, cos_sin):
        """Rotate-half rope. q [T, H, D], k [T, KVH, D], positions [T] (int64
        avoids a copy), cos_sin float32 [max_positions, D] (cos | sin) -> new
        (q, k). Positions must be < max_positions: they are not read on the host."""
        q, k, positions, cos_sin = self._check_rope(q, k, positions, cos_sin)
        outs = []
        for x in (q, k):
            out = cupy.empty_like(x)
            self._launch("rope_kernel", _ctype(x, "q"), (x.shape[0],), _row_threads(x.shape[1] * x.shape[2] // 2),
                         (x, out, positions, cos_sin, np.int32(x.shape[1]), np.int32(x.shape[2])))
            outs.append(out)
        return tuple(outs)

    # -- row reductions ------------------------------------------------------

    def _norm(self, kernel, x, params, eps, residual):
        x = cupy.ascontiguousarray(x)
        params = [cupy.ascontiguousarray(p) for p in params]  # weight (and bias), each [hidden]
        _same_dtype(x, *params)
        if any(p.shape != (x.shape[-1],) for p in params):
            raise ValueError(f"norm weight / bias {[p.shape for p in params]} must be ({x.shape[-1]},)")
        res_in = res_out = x  # x stands in for the unused residual pointers
        if residual is not None:
            res_in, res_out = cupy.ascontiguousarray(residual), cupy.empty_like(x)
            _same_dtype(x, res_in)
            if res_in.shape != x.shape:
                raise ValueError(f"residual {res_in.shape} must match x {x.shape}")
        out = cupy.empty_like(x)
        hidden, threads = x.shape[-1], _row_threads(x.shape[-1])
        if kernel == "rms_norm_kernel" and _vectors(hidden, x, res_in, *params, out, res_out) \
                and hidden <= 8 * _NORM_VECS * 1024:
            kernel, threads = "rms_norm_vec_kernel", (_norm_vec_threads(hidden),)
        self._launch(kernel, _ctype(x, "x"), (_rows(x),), threads,
                     (x, res_in, *params, out, res_out, np.int32(residual is not None), np.int32(hidden),
                      np.float32(eps)))
        return out if residual is None else (out, res_out)

    def rms_norm(self, x, weight, eps: float, residual=None):
        """RMSNorm of x (or x + residual); with a residual returns (normed, x + residual)."""
        return self._norm("rms_norm_kernel", x, [weight], eps, residual)

    def layer_norm(self, x, weight, bias, eps: float, residual=None):
        """LayerNorm of x (or x + residual); same return convention as rms_norm."""
        return self._norm("layer_norm_kernel", x, [weight, bias], eps, residual)

    def softmax(self, x):
        # along the last axis; float32 out
        x = cupy.ascontiguousarray(x)
        out = cupy.empty(x.shape, dtype=cupy.float32)
        self._launch("softmax_kernel", _ctype(x, "x"), (_rows(x),), _row_threads(x.shape[-1]),
                     (x, out, np.int32(x.shape[-1])))
        return out

    def topk_softmax(self, router_logits, top_k: int, renormalize: bool):
        """router_logits [T, E] -> (weights [T, top_k] float32, ids [T, top_k] int32)."""
        logits = cupy.ascontiguousarray(router_logits)
        ctype = _ctype(logits, "router_logits")
        if logits.ndim != 2:
            raise ValueError(f"router_logits must be [num_tokens, num_experts], got {logits.shape}")
        num_tokens, num_experts = logits.shape
        if not 0 < top_k <= num_experts or num_experts > _MAX_EXPERTS:
            raise ValueError(f"top_k {top_k} must be in 1..num_experts ({num_experts} <= {_MAX_EXPERTS})")
        weights = cupy.empty((num_tokens, top_k), dtype=cupy.float32)
        ids = cupy.empty((num_tokens, top_k), dtype=cupy.int32)
        self._launch("topk_softmax_kernel", ctype, (num_tokens,), _row_threads(num_experts),
                     (logits, weights, ids, np.int32(num_experts), np.int32(top_k), np.int32(bool(renormalize))),
                     shared_mem=4 * num_experts)
        return weights, ids

