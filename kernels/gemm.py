"""cuBLAS GEMMs through nvmath-python's bindings, safe inside CUDA-graph capture.

`CublasGemm` owns one cuBLAS handle and its own 32 MiB workspace. Before each
call it binds the handle to CuPy's current stream and re-attaches the
workspace (cublasSetStream resets it), so a GEMM issued while a stream
captures lands in the graph and never asks cuBLAS to allocate. CuPy's own
matmul cannot be used here: it refuses capture.

bf16 and fp16 GEMMs of decode-sized inputs go through cuBLASLt with an
algorithm measured per shape (gemm_lt.py) unless SHARDLINE_GPU_OFF names
`gemm_autotune`; fp32, longer inputs and shapes cuBLASLt fails on keep
cublasGemmEx with cuBLAS's default algorithm.

This module must not allocate its outputs or choose shapes: callers pass
contiguous row-major cupy arrays and the output buffer.
"""

from __future__ import annotations

import logging

import cupy
import numpy as np
from nvmath import CudaDataType
from nvmath.bindings import cublas

from shardline.kernels.backend import gpu_paths_off
from shardline.kernels.gemm_lt import LtAutotuner

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 32 << 20

# storage dtype -> cuBLAS data type; all accumulate in float32
# (CUBLAS_COMPUTE_32F, not TF32, so fp32 GEMMs stay at fp32 accuracy).
_DATA_TYPES = {
    np.dtype(np.uint16): CudaDataType.CUDA_R_16BF,  # bf16 bit patterns
    np.dtype(np.float16): CudaDataType.CUDA_R_16F,
    np.dtype(np.float32): CudaDataType.CUDA_R_32F,
}
_TUNED_DTYPES = (np.dtype(np.uint16), np.dtype(np.float16))


class CublasGemm:
    def __init__(self, workspace_bytes: int = WORKSPACE_BYTES, autotune: bool | None = None):
        """`autotune`: measure a cuBLASLt algorithm per shape; None takes SHARDLINE_GPU_OFF's word."""
        self._handle = cublas.create()
        self._workspace = cupy.empty(workspace_bytes, dtype=cupy.uint8)
        # Host scalars (CUBLAS_POINTER_MODE_HOST): read when the call is made,
        # so they are baked into a captured graph's kernel arguments.
        self._one = np.ones(1, dtype=np.float32)
        self._zero = np.zeros(1, dtype=np.float32)
        if autotune is None:
            autotune = "gemm_autotune" not in gpu_paths_off()
        self.tuner = _create_tuner(self._workspace) if autotune else None

    def _bind_stream(self) -> None:
        stream_ptr = cupy.cuda.get_current_stream().ptr
        cublas.set_stream(self._handle, stream_ptr)
        cublas.set_workspace(self._handle, self._workspace.data.ptr, self._workspace.nbytes)

    def matmul_nt(self, x, weight, out, accumulate: bool = False) -> None:
        """out[T, N] = x[T, K] @ weight[N, K]^T (+ out when accumulate)."""
        data_type = _DATA_TYPES[x.dtype]
        if self.tuner is not None and x.dtype in _TUNED_DTYPES \
                and self.tuner.matmul(x, weight, out, accumulate, data_type, self.gemm_ex):
            return
        self.gemm_ex(x, weight, out, accumulate)

    def gemm_ex(self, x, weight, out, accumulate: bool = False) -> None:
        """matmul_nt by cublasGemmEx with cuBLAS's default algorithm (what the tuner measures
        its candidates against).

        Row-major x/out are column-major x^T/out^T, so cuBLAS computes
        out^T = weight^T(op T on the [K, N] col-major view) @ x^T.
        """
        num_tokens, k = x.shape
        n = weight.shape[0]
        data_type = _DATA_TYPES[x.dtype]
        self._bind_stream()
        beta = self._one if accumulate else self._zero
        cublas.gemm_ex(
            self._handle, cublas.Operation.T, cublas.Operation.N,
            n, num_tokens, k,
            self._one.ctypes.data,
            weight.data.ptr, data_type, k,
            x.data.ptr, data_type, k,
            beta.ctypes.data,
            out.data.ptr, data_type, n,
            cublas.ComputeType.COMPUTE_32F, cublas.GemmAlgo.DEFAULT,
        )

    def close(self) -> None:
        if self.tuner is not None:
            self.tuner.close()
            self.tuner = None
        if self._handle:
            cublas.destroy(self._handle)
            self._handle = 0

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass


def _create_tuner(workspace) -> LtAutotuner | None:
    try:
        return LtAutotuner(workspace)
    except Exception as err:   # no cuBLASLt library: every GEMM keeps cublasGemmEx
        log.warning("cuBLASLt unavailable, GEMMs run cublasGemmEx: %s: %s", type(err).__name__, err)
        return None
