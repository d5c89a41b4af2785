"""Backend selection: which array library and which kernels a process uses.

`create_backend` is called once, at the entry point; the resulting
`Backend` is passed down to the model and runner. Nothing else in the code
branches on the backend: it calls `backend.ops.<op>` and moves data with
`backend.asarray` / `backend.to_numpy`.

On NumPy, activations and weights are float32 (float64 for reference
tests). On CUDA they are bf16 (stored as uint16 bit patterns, since CuPy has
no bfloat16 dtype), fp16, or fp32 (for kernel tests).
"""

from __future__ import annotations

import os

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

BACKENDS = ("auto", "numpy", "cuda")
NUMPY_DTYPES = ("float32", "float64")
CUDA_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Backend:
    name: str          # "numpy" or "cuda"
    dtype: str         # storage dtype of activations and weights
    xp: ModuleType     # numpy or cupy
    ops: Any           # kernels.numpy_ops or kernels.cuda_ops.CudaOps
    device_id: int = 0

    def activate(self) -> None:
        """Make this backend's GPU current in the calling thread (CUDA's current
        device is per thread); a no-op on NumPy."""
        if self.name == "cuda":
            self.xp.cuda.Device(self.device_id).use()

    def asarray(self, host: np.ndarray) -> Any:
        """Host array -> backend array; floating arrays take the backend dtype."""
        if np.issubdtype(host.dtype, np.floating):
            return self.ops.from_float(np.asarray(host), self.dtype) if self.name == "cuda" \
                else np.ascontiguousarray(host, dtype=self.dtype)
        return self.xp.asarray(host)

    @property
    def storage_dtype(self) -> Any:
        """The array dtype that holds `dtype` (bf16 lives in uint16)."""
        return self.xp.uint16 if self.dtype == "bfloat16" else self.xp.dtype(self.dtype)

    def zeros(self, shape: tuple[int, ...]) -> Any:
        return self.xp.zeros(shape, dtype=self.storage_dtype)

    def free_device_bytes(self) -> int | None:
        """Free GPU memory now, with what CuPy's pool holds unused (a load's temporaries, the MoE
        experts' weights before they were stacked) given back first; None on NumPy (host memory is
        sized by config)."""
        if self.name == "numpy":
            return None
        self.xp.get_default_memory_pool().free_all_blocks()
        return int(self.xp.cuda.runtime.memGetInfo()[0])

    def to_numpy(self, arr: Any) -> np.ndarray:
        """Backend array -> host array; floating data comes back as float32 (or
        float64 on a float64 NumPy backend)."""
        if self.name == "numpy":
            return arr
        return self.ops.to_host(arr)


GPU_PATHS = ("flash", "flash_decode", "flash_sm90", "skinny_gemm", "fused_norm_gemm", "fused_rope_gemm", "nccl_links",
             "dependent_launch", "gemm_autotune", "residual_in_gemm", "norm_in_consumer", "read_flush",
             "timer_lead")


def gpu_paths_off() -> frozenset[str]:
    """GPU fast paths switched off by SHARDLINE_GPU_OFF (e.g. flash,skinny_gemm), for A/B
    runs and as an escape hatch: the flash attention kernels (off: attention.cu's kernel),
    flash_decode.cu for decode steps (off: flash_attention.cu's decode shape), the wgmma prefill
    kernel on sm_90 (flash_sm90; off: flash_attention.cu's prefill shape), the skinny GEMM
    (off: cuBLAS), the RMSNorm fused into it (off: rms_norm, then the GEMM), RoPE and the
    KV-cache write fused into it (fused_rope_gemm; off: rope_write_kv after it), NCCL pair links
    for the KV hand-off (off: over gRPC), dependent launches in captured graphs (off:
    ordinary launches), the per-shape cuBLASLt GEMM choice (gemm_autotune; off:
    cublasGemmEx's default) and the residual stream summed by the GEMMs before the norms
    (residual_in_gemm, linear_add; off: the add fused into the norm) and a folded RMSNorm scaled
    by the kernel after its GEMM (norm_in_consumer; off: the norm kernel with a unit weight),
    and the L2 flushed by a read while GEMMs are timed (read_flush; off: by a memset), and the
    timed reps queued behind a spin (timer_lead; off: launched as the host gets to them). All
    are on by default."""
    names = frozenset(filter(None, os.environ.get("SHARDLINE_GPU_OFF", "").replace(" ", "").split(",")))
    unknown = names - set(GPU_PATHS)
    if unknown:
        raise ValueError(f"SHARDLINE_GPU_OFF: unknown {sorted(unknown)}; known: {', '.join(GPU_PATHS)}")
    return names


def cuda_available() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no cupy, no driver, no device: all mean "no GPU here"
        return False


def create_backend(name: str = "auto", dtype: str | None = None, device_id: int = 0) -> Backend:
    """`auto` picks CUDA when CuPy sees a GPU, else NumPy."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "auto":
        name = "cuda" if cuda_available() else "numpy"
    if name == "numpy":
        dtype = dtype or "float32"
        if dtype not in NUMPY_DTYPES:
            raise ValueError(f"numpy backend dtype must be one of {NUMPY_DTYPES}, got {dtype!r}")
        from shardline.kernels import numpy_ops
        return Backend("numpy", dtype, np, numpy_ops)
    dtype = dtype or "bfloat16"
    if dtype not in CUDA_DTYPES:
        raise ValueError(f"cuda backend dtype must be one of {CUDA_DTYPES}, got {dtype!r}")
    import cupy
    from shardline.kernels.cuda_ops import CudaOps
    cupy.cuda.Device(device_id).use()
    return Backend("cuda", dtype, cupy, CudaOps(device_id), device_id)
