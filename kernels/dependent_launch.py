"""Kernel launches with programmatic dependent launch (PDL), through the driver's
cuLaunchKernelEx (ctypes on libcuda; cupy's launch path has no launch attributes).

A kernel launched so may be scheduled while the kernel before it in the stream
still runs, once that one lets it (every kernel of ours calls pdl_begin() in
common.cu: it waits for the previous kernel, then lets the next one start). In
a captured CUDA graph this becomes a programmatic edge, which hides the ~2 us
launch and ramp-up gap between consecutive small kernels of a decode step.

Only for kernels compiled from our .cu files (they wait before reading what
the previous kernel wrote); cuBLAS and cupy kernels keep ordinary launches.
This module must not choose when to use it: CudaOps does (inside graph
capture, where the Python cost of building the launch is paid once).
resident_blocks asks the same driver how many blocks of a kernel fit an SM, cluster_width
the cluster width it was compiled with.
"""

from __future__ import annotations

import ctypes

import cupy
import numpy as np

_PROGRAMMATIC_STREAM_SERIALIZATION = 6   # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


class _Attribute(ctypes.Structure):   # CUlaunchAttribute: id, pad to 8, a 64-byte value union
    _fields_ = [("id", ctypes.c_uint), ("pad", ctypes.c_char * 4), ("value", ctypes.c_ubyte * 64)]


class _Config(ctypes.Structure):      # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem_bytes", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_Attribute)), ("num_attrs", ctypes.c_uint)]


_driver = None


def _libcuda():
    global _driver
    if _driver is None:
        driver = ctypes.CDLL("libcuda.so.1")
        driver.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_Config), ctypes.c_void_p,
                                            ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
        driver.cuLaunchKernelEx.restype = ctypes.c_int
        driver.cuOccupancyMaxActiveBlocksPerMultiprocessor.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_void_p,
                                                                       ctypes.c_int, ctypes.c_size_t]
        driver.cuOccupancyMaxActiveBlocksPerMultiprocessor.restype = ctypes.c_int
        driver.cuFuncGetAttribute.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_void_p]
        driver.cuFuncGetAttribute.restype = ctypes.c_int
        _driver = driver
    return _driver


def _launch_kernel_ex():
    return _libcuda().cuLaunchKernelEx


def resident_blocks(function, threads: int, shared_mem: int = 0) -> int:
    """How many blocks of `threads` threads of a cupy RawKernel fit on one SM at once (its
    registers and shared memory against the SM's), by the driver's occupancy calculator."""
    blocks = ctypes.c_int()
    status = _libcuda().cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(blocks), function.kernel.ptr,
                                                                    threads, shared_mem)
    if status:
        raise RuntimeError(f"cuOccupancyMaxActiveBlocksPerMultiprocessor failed with CUresult {status}")
    return blocks.value


_REQUIRED_CLUSTER_WIDTH = 11   # CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_WIDTH


def cluster_width(function) -> int | None:
    """The thread-block cluster width a cupy RawKernel was compiled with (__cluster_dims__; 1
    without one), as its launches must honour it; None where the driver does not say."""
    width = ctypes.c_int()
    status = _libcuda().cuFuncGetAttribute(ctypes.byref(width), _REQUIRED_CLUSTER_WIDTH, function.kernel.ptr)
    return None if status else max(1, width.value)


def _argument(value):
    """A ctypes object holding one kernel argument's bytes."""
    if value is None:
        return ctypes.c_void_p(0)
    if isinstance(value, cupy.ndarray):
        return ctypes.c_void_p(value.data.ptr)
    if isinstance(value, np.generic):
        return (ctypes.c_char * value.nbytes).from_buffer_copy(value.tobytes())
    raise TypeError(f"kernel arguments must be cupy arrays or NumPy scalars, got {type(value).__name__}")


def launch_dependent(function, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0) -> None:
    """Launches a cupy RawKernel on the current stream, allowed to overlap the kernel before it."""
    grid, block = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]
    attribute = _Attribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
    attribute.value[0] = 1   # programmaticStreamSerializationAllowed (an unsigned int, little-endian)
    config = _Config((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared_mem,
                     cupy.cuda.get_current_stream().ptr, ctypes.pointer(attribute), 1)
    holders = [_argument(a) for a in args]
    params = (ctypes.c_void_p * len(holders))(*(ctypes.addressof(h) for h in holders))
    handle = function.kernel.ptr   # the RawKernel's CUfunction on the current device
    status = _launch_kernel_ex()(ctypes.byref(config), handle, params, None)
    if status:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {status} "
                           f"(grid {grid}, block {block}, shared memory {shared_mem} bytes)")
