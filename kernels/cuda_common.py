"""Shared plumbing for cuda_ops.py: which kernels exist, compiling them with
NVRTC, and host-side dtype and shape checks. No kernel launches here.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path

import cupy
import numpy as np

from shardline.kernels.build_cache import cache_path, cached_build, forget

log = logging.getLogger(__name__)
_KERNEL_DIR = Path(__file__).resolve().parent
_STORAGE = ("float", "__half", "__nv_bfloat16")
_WORDS = ("unsigned char", "unsigned short", "unsigned int", "unsigned long long")  # by itemsize 1, 2, 4, 8
_FLASH_HEAD_DIMS = (16, 32, 64, 80, 96, 128)   # flash_attention.cu's and flash_decode.cu's instantiations
_FLASH_SM90_HEAD_DIMS = (64, 128)   # flash_prefill_sm90.cu's: 64-column swizzle blocks, P V as m64n64 or m64n128
_FLASH_SM90_THREADS, _FLASH_SM90_ROWS = 256, 128   # F9_THREADS, F9_BQ


def _decode_tiles(text: str) -> tuple[tuple[tuple[int, int, int], float], ...]:
    """"16x2x4<2,16x3x2<6,16x2x4" -> (((16, 2, 4), 2.0), ((16, 3, 2), 6.0), ((16, 2, 4), inf)):
    flash_decode.cu's tiles (keys per tile, tiles in flight, warps a block), each for launches
    of fewer blocks an SM (before key splits) than its bound; the last one has no bound."""
    entries = []
    try:
        for value in text.split(","):
            tile, _, bound = value.partition("<")
            entries.append((tuple(int(part) for part in tile.split("x")), float(bound) if bound else math.inf))
    except ValueError:
        entries = []
    if not entries or entries[-1][1] != math.inf or any(
            len(tile) != 3 or tile[0] not in (16, 32) or tile[1] < 2 or tile[2] not in (1, 2, 4, 8) for tile, _ in entries):
        raise ValueError(f"SHARDLINE_FLASH_DECODE_TILES: KEYSxSTAGESxWARPS<BLOCKS_PER_SM values, the last without "
                         f"a bound (keys 16 or 32, stages >= 2, warps 1, 2, 4 or 8), got {text!r}")
    return tuple(entries)


# flash_decode.cu's tiles by blocks an SM, as bench/flash_tile_sweep.py suggested on an H100 (1x
# H100, us a layer at 512 keys, 3 deep / 2 deep: batch 48 49.1 / 43.4, 64 56.8 / 61.4, 128
# 107.2 / 104.9; 2 warps a block were no faster), with 8 warps below 1.5 blocks an SM (decode
# steps in one engine, 4 / 8 warps: Llama-3-8B batch 1 6.07 / 6.07 ms, batch 16 6.97 / 6.90;
# SmolLM2 batch 1 0.74-0.87 / 0.70-0.71; bench/notes/step_ab*_h100.json).
# SHARDLINE_FLASH_DECODE_TILES sets others.
_FLASH_DECODE_TILES = _decode_tiles(os.environ.get(
    "SHARDLINE_FLASH_DECODE_TILES", "16x3x8<1.5,16x3x4<2.42,16x2x4<3.39,16x3x4<4.85,16x2x4"))
# Decode-sized GEMMs (skinny_gemm.cu): at most this many rows of x, bf16/fp16, K % 8 == 0;
# their K split over this many warps of a block (KS) as CudaOps.skinny_k_split picks.
_SKINNY_MAX_ROWS, _SKINNY_ROWS_PER_BLOCK, _SKINNY_THREADS = 4, 8, 128   # SG_ROWS x SG_WARPS, 32 x SG_WARPS
_SKINNY_K_SPLITS = (1, 2, 4)


def _skinny_tiles(num_out: int, gated: bool, k_split: int) -> int:
    """Blocks of a skinny GEMM launch (its tiles): a warp (k_split warps) an output pair, gated
    an output."""
    per_block = (_SKINNY_ROWS_PER_BLOCK // 2 if gated else _SKINNY_ROWS_PER_BLOCK) // k_split
    return -(-num_out // per_block)


def flash_decode_template(ctype: str, head_dim: int, tile: tuple[int, int, int]) -> str:
    """flash_decode_kernel's template arguments for a tile: "T, D, BK, STAGES, KW"."""
    return f"{ctype}, {head_dim}, {', '.join(map(str, tile))}"


# module file -> {kernel: template arguments to instantiate (None: not a template)}
_KERNELS = {
    "elementwise": {"add_kernel": _STORAGE, "silu_and_mul_kernel": _STORAGE, "gelu_kernel": _STORAGE,
                    "silu_and_mul_vec_kernel": _STORAGE[1:], "silu_and_mul_rms_vec_kernel": _STORAGE[1:],
                    "rope_kernel": _STORAGE,
                    "rope_write_kv_kernel": tuple(f"{t}, 1" for t in _STORAGE) + tuple(f"{t}, 8" for t in _STORAGE[1:]),
                    "scatter_add_rows_kernel": _STORAGE,
                    "fill_rows_kernel": _STORAGE, "gather_rows_kernel": _WORDS, "write_kv_kernel": _WORDS,
                    "copy_blocks_kernel": _WORDS, "gather_cache_rows_kernel": _WORDS,
                    "scatter_cache_rows_kernel": _WORDS, "stage_decode_inputs_kernel": None},
    "norms": {"rms_norm_kernel": _STORAGE, "rms_norm_vec_kernel": _STORAGE[1:], "layer_norm_kernel": _STORAGE,
              "softmax_kernel": _STORAGE,
              "topk_softmax_kernel": _STORAGE},
    "attention": {"attention_kernel": _STORAGE, "attention_combine_kernel": _STORAGE},
    "flash_attention": {"flash_attention_kernel": tuple(f"{t}, {d}, {kw}" for t in ("__half", "__nv_bfloat16")
                                                        for d in _FLASH_HEAD_DIMS for kw in (1, 4))},
    "flash_prefill": {"flash_prefill_kernel": tuple(f"{t}, {d}" for t in ("__half", "__nv_bfloat16")
                                                    for d in _FLASH_HEAD_DIMS)},
    "flash_prefill_sm90": {"flash_prefill_sm90_kernel": tuple(f"{t}, {d}" for t in ("__half", "__nv_bfloat16")
                                                              for d in _FLASH_SM90_HEAD_DIMS)},
    "flash_decode": {"flash_decode_kernel": tuple(flash_decode_template(t, d, tile)
                                                  for t in ("__half", "__nv_bfloat16") for d in _FLASH_HEAD_DIMS
                                                  for tile in dict.fromkeys(tile for tile, _ in _FLASH_DECODE_TILES))},
    "skinny_gemm": {kernel: tuple(f"{t}, {m}, {ks}" for t in ("__half", "__nv_bfloat16")
                                  for m in range(1, _SKINNY_MAX_ROWS + 1) for ks in _SKINNY_K_SPLITS)
                    for kernel in ("skinny_gemm_kernel", "skinny_gemm_looped_kernel", "norm_skinny_gemm_kernel",
                                   "skinny_gemm_rope_kernel", "skinny_gemm_rope_looped_kernel",
                                   "norm_skinny_gemm_rope_kernel")},
    "expert_gemm": {"expert_skinny_gemm_kernel": tuple(f"{t}, {ks}" for t in ("__half", "__nv_bfloat16")
                                                       for ks in _SKINNY_K_SPLITS)},
    "sampling": {"sample_kernel": _STORAGE, "apply_penalties_kernel": _STORAGE,
                 "sampling_uniform_kernel": None, "penalty_counts_kernel": None},
}
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float16): "__half", np.dtype(np.uint16): "__nv_bfloat16"}
_STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
_THREADS = 256
_ATTENTION_THREADS = 128  # ATTN_CHUNK in attention.cu
_SAMPLE_THREADS = 512   # sample_kernel's __launch_bounds__
_SAMPLE_CLUSTER = 8     # sampling.cu's SAMPLE_CLUSTER
_MAX_HEAD_DIM = 256
_MAX_EXPERTS = 8192  # their probabilities fill at most 32 KiB of shared memory
_MAX_GRID_Y = 65535
_NORM_VECS = 4   # NORM_VECS in norms.cu: 8-element vectors a thread keeps
# Attention splits each row's keys over more blocks while the launch has fewer
# (head, query) blocks than this: decode batches fill the GPU, prefill needs no split.
_ATTENTION_TARGET_BLOCKS = 8192
_MAX_ATTENTION_SPLITS = 32
# Tensor-core attention (flash_attention.cu) for bf16/fp16 paged launches of these head sizes.
# Launches averaging at least _FLASH_PREFILL_ROWS packed (query, head) rows a sequence run
# the prefill shape (4 warps over 64 rows, or on sm_90 flash_prefill_sm90.cu's 8 over 128);
# fewer, the decode shape (4 warps over the keys of 16 rows). Launches of fewer blocks than
# twice the multiprocessors also split each row's keys over up to _FLASH_MAX_SPLITS blocks.
_FLASH_THREADS, _FLASH_PREFILL_ROWS, _FLASH_MAX_SPLITS = 128, 64, 16
# Launches of at most _FLASH_DECODE_ROWS rows a sequence (decode steps; a padding token's
# rows allowed) run flash_decode.cu (8 rows a block, keys as the mma's M), splitting keys
# while the launch has fewer blocks than _FLASH_DECODE_SPLIT_TARGET an SM (more splits
# were slower at every batch in bench/flash_tile_sweep.py).
_FLASH_DECODE_ROWS, _FLASH_DECODE_SPLIT_TARGET = 8, 1
# ... and give each split at least this many keys (a decode step at 512 tokens of context on an H200:
# Llama-3-8B and SmolLM2 at batch 1 fastest with 85-112 keys a split, against 57 and 32 before).
_FLASH_DECODE_MIN_SPLIT_KEYS = 96
_FLASH_COUNTERS = 4096   # (tile, KV head) pairs a split launch may have: splits need < 2 per SM
# Modules whose failure to compile only turns their kernels off (with a warning).
_OPTIONAL_MODULES = frozenset({"flash_attention", "flash_prefill", "flash_prefill_sm90", "flash_decode",
                               "skinny_gemm", "expert_gemm"})
# Modules built for one architecture alone, by NVRTC with -arch=<target> (CuPy builds the rest for
# the device's generic architecture, which has no wgmma): compiled only on devices of that compute
# capability. module -> (target, compute capability)
_ARCH_MODULES = {"flash_prefill_sm90": ("sm_90a", "90")}
# Modules compiled with other files in front of them (after common.cu).
_PRELUDES = {"flash_attention": ("flash_common",), "flash_prefill": ("flash_common", "flash_attention"),
             "flash_prefill_sm90": ("flash_common", "flash_attention", "flash_sm90_common"),
             "flash_decode": ("flash_common", "flash_decode_loads"), "expert_gemm": ("skinny_gemm",)}


def flash_smem_bytes(head_dim: int, key_warps: int) -> int:
    """Dynamic shared memory of flash_attention_kernel<T, head_dim, key_warps>: STAGES of
    K and V tiles per key-warp group (rows padded by 8), reused at the end for the
    groups' merge (float32 max, sum and output rows)."""
    keys, stages = (64, 2) if key_warps == 1 else (16, 2)   # at head_dim 128: 68 and 34 KiB
    return max(key_warps * stages * 2 * keys * (head_dim + 8) * 2,
               (2 * key_warps * 16 + key_warps * 16 * head_dim) * 4)


def flash_prefill_smem_bytes(head_dim: int, keys: int = 64, stages: int = 2) -> int:
    """Dynamic shared memory of flash_prefill_kernel<T, head_dim>: flash_attention_kernel's KW = 1
    stages (`stages` tiles of `keys` keys, K and V; bench/flash_tile_sweep.py patches them) and
    each of its 4 warps' 32 Q rows, rows padded by 8."""
    return (stages * 2 * keys + 4 * 32) * (head_dim + 8) * 2


def flash_prefill_sm90_smem_bytes(head_dim: int) -> int:
    """Dynamic shared memory of flash_prefill_sm90_kernel<T, head_dim>: the block's 128 Q rows and
    F9_STAGES (2) tiles of F9_BK (64) keys, K and V, unpadded, and 1 KiB to align them to 1024
    bytes (97 KiB at head_dim 128: two blocks an SM)."""
    return (_FLASH_SM90_ROWS + 2 * 2 * 64) * head_dim * 2 + 1024


def flash_decode_smem_bytes(head_dim: int, tile: tuple[int, int, int]) -> int:
    """Dynamic shared memory of flash_decode_kernel<T, head_dim, keys, stages, warps>: the
    warps' stages of K and V tiles (rows padded by 8), reused at the end for their merge
    (8 rows each). At head_dim 128, 8.5 KiB a warp and stage of 16 keys: 102 KiB for
    (16, 3, 4), two blocks an SM; 51 KiB for (16, 3, 2), four."""
    keys, stages, warps = tile
    return max(warps * stages * 2 * keys * (head_dim + 8) * 2, (2 * warps * 8 + warps * 8 * head_dim) * 4)


def _include_options() -> tuple[str, ...]:
    """-I for each CUDA include folder holding cuda_bf16.h or crt/mma.h (NVRTC
    ships neither built in): the toolkit's first, then the nvidia wheels'
    (cudart's has cuda_bf16.h; mma.h needs crt/mma.h, which may sit elsewhere)."""
    get_cuda_path = getattr(cupy.cuda, "get_cuda_path", lambda: None)
    candidates = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), get_cuda_path(), "/usr/local/cuda"]
    dirs = [os.path.join(root, "include") for root in candidates if root]
    for library in ("cudart", "crt"):
        try:
            from cuda import pathfinder
            dirs.append(pathfinder.find_nvidia_header_directory(library))
        except Exception:  # an older cuda-pathfinder, or no such wheel: the toolkit's may do
            pass
    found = [d for d in dict.fromkeys(dirs) if d and (os.path.isfile(os.path.join(d, "cuda_bf16.h"))
                                                       or os.path.isfile(os.path.join(d, "crt", "mma.h")))]
    return tuple(f"-I{d}" for d in found)


class _ArchKernel:
    """A kernel of a module built by _compile_for_arch, with the surface of CuPy's RawKernel that
    CudaOps uses: a call, `kernel` (the function with its CUfunction `ptr`) and the two attributes
    it sets and reads."""

    _MAX_DYNAMIC_SHARED, _CARVEOUT = 8, 9   # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, ..._CARVEOUT

    def __init__(self, function):
        self.kernel = function

    def __call__(self, grid, block, args, shared_mem: int = 0) -> None:
        self.kernel(grid, block, args, shared_mem=shared_mem)

    def _get(self, attribute: int) -> int:
        return cupy.cuda.driver.funcGetAttribute(attribute, self.kernel.ptr)

    def _set(self, attribute: int, value: int) -> None:
        cupy.cuda.driver.funcSetAttribute(self.kernel.ptr, attribute, value)

    max_dynamic_shared_size_bytes = property(lambda self: self._get(self._MAX_DYNAMIC_SHARED),
                                             lambda self, value: self._set(self._MAX_DYNAMIC_SHARED, value))
    preferred_shared_memory_carveout = property(lambda self: self._get(self._CARVEOUT),
                                                lambda self, value: self._set(self._CARVEOUT, value))


def _compile_for_arch(source: str, names: dict, options: tuple[str, ...], target: str) -> dict:
    """{key: function} of `source` built by NVRTC for one architecture (`target`, e.g. sm_90a)
    and loaded as a module; CuPy's RawModule would add its own -arch. Builds are kept on disk
    (build_cache.py). Raises CompileException."""
    from cupy_backends.cuda.libs import nvrtc

    options = tuple(options) + ("-ftz=true", "--device-as-default-execution-space", f"-arch={target}")
    expressions = sorted(set(names.values()))

    def build() -> tuple[bytes, dict[str, str]]:
        program = nvrtc.createProgram(source, "shardline_arch.cu", (), ())
        try:
            for expression in expressions:
                nvrtc.addNameExpression(program, expression)
            try:
                nvrtc.compileProgram(program, list(options))
            except nvrtc.NVRTCError:
                raise cupy.cuda.compiler.CompileException(nvrtc.getProgramLog(program), source, "shardline_arch.cu",
                                                          options, "nvrtc") from None
            return nvrtc.getCUBIN(program), {e: nvrtc.getLoweredName(program, e) for e in expressions}
        finally:
            nvrtc.destroyProgram(program)

    path = cache_path(source, expressions, options, nvrtc.getVersion(), _header_digest(options))
    cubin, lowered = cached_build(path, build)
    module = cupy.cuda.function.Module()
    try:
        module.load(cubin)
    except cupy.cuda.driver.CUDADriverError:   # a kept build this driver refuses: build it again, once
        forget(path)
        cubin, lowered = cached_build(path, build)
        module.load(cubin)
    return {key: _ArchKernel(module.get_function(lowered[expression])) for key, expression in names.items()}


def _header_digest(options: tuple[str, ...]) -> str:
    """sha256 of the fp16/bf16 headers in the -I folders of `options`: a toolkit updated in place
    changes what the same source builds to."""
    digest = hashlib.sha256()
    for option in options:
        if option.startswith("-I"):
            for header in sorted(Path(option[2:]).glob("cuda_[bf][fp]16*")):
                digest.update(header.name.encode() + header.read_bytes())
    return digest.hexdigest()


def _module_source(module_name: str) -> str:
    """A module's CUDA source: common.cu, its preludes, then its own file."""
    files = ("common",) + _PRELUDES.get(module_name, ()) + (module_name,)
    return "\n".join((_KERNEL_DIR / f"{name}.cu").read_text() for name in files)


def _kernel_names(module_name: str) -> dict:
    """{(kernel, template arguments or None): name expression} of a module's instantiations."""
    return {(k, t): (f"{k}<{t}>" if t else k) for k, types in _KERNELS[module_name].items() for t in (types or (None,))}


def _compile_kernels() -> dict:
    options = ("-std=c++17",) + _include_options()
    capability = str(cupy.cuda.Device().compute_capability)
    functions = {}
    for module_name in _KERNELS:
        target, arch_capability = _ARCH_MODULES.get(module_name, (None, None))
        if target is not None and capability != arch_capability:
            continue
        names, source = _kernel_names(module_name), _module_source(module_name)
        try:
            if target is not None:
                functions.update(_compile_for_arch(source, names, options, target))
                continue
            module = cupy.RawModule(code=source, options=options, name_expressions=list(names.values()))
            for key, expression in names.items():
                functions[key] = module.get_function(expression)   # compiles the module
        except (cupy.cuda.compiler.CompileException, cupy.cuda.driver.CUDADriverError, KeyError) as err:
            if module_name not in _OPTIONAL_MODULES:
                raise
            log.warning("%s.cu did not compile or load; its kernels are off: %s", module_name, str(err)[:2000])
    return functions


def _ctype(arr, what: str) -> str:
    try:
        return _CTYPES[arr.dtype]
    except KeyError:
        raise ValueError(f"{what} must be bfloat16 (uint16 bits), float16 or float32, got {arr.dtype}") from None


def _word(arr) -> str:
    return _WORDS[int(math.log2(arr.itemsize))]


def _row_word(row_bytes: int) -> tuple[str, int]:
    """The widest word (up to 8 bytes) that tiles a row of `row_bytes`, and the words per row:
    rows copied as 8-byte words move 4x fewer elements than as bf16."""
    size = 8
    while row_bytes % size:
        size //= 2
    return _WORDS[int(math.log2(size))], row_bytes // size


def _same_dtype(reference, *others) -> None:
    for arr in others:
        if arr.dtype != reference.dtype:
            raise ValueError(f"dtype mismatch: {arr.dtype} vs {reference.dtype}")


def _as(arr, dtype):
    # contiguous device array of dtype; host arrays and other dtypes are copied
    return cupy.ascontiguousarray(cupy.asarray(arr, dtype=dtype))


def _index(arr):
    return _as(arr, cupy.int64).ravel()  # [n] int64


def _in_place(*arrays) -> None:
    if not all(a.flags.c_contiguous for a in arrays):
        raise ValueError("arrays written in place (caches, out) must be C-contiguous")


def _grid_1d(n: int) -> tuple[int]:
    return (min(-(-n // _THREADS), 1 << 16),)  # (0,) for nothing: no launch


def _row_threads(width: int) -> tuple[int]:
    # about four elements a thread, a whole number of warps, at most 1024
    return (min(1024, 32 * max(1, -(-width // 128))),)


def _token_rows(a) -> tuple:
    """(a, its token stride in elements) for a [tokens, heads, head_dim] whose tokens may be
    strided but whose heads are contiguous within a token; otherwise a contiguous copy."""
    item = a.itemsize
    if a.ndim == 3 and a.strides[2] == item and (a.shape[1] == 1 or a.strides[1] == a.shape[2] * item) \
            and a.strides[0] % item == 0 and a.strides[0] >= a.shape[1] * a.shape[2] * item:
        return a, a.strides[0] // item
    a = cupy.ascontiguousarray(a)
    return a, math.prod(a.shape[1:])


def _vectors(width: int, *arrays) -> bool:
    """Whether 16-bit rows of `width` elements can go in 16-byte vectors (the *_vec kernels)."""
    return width % 8 == 0 and all(a.itemsize == 2 and a.data.ptr % 16 == 0 for a in arrays)


def _rms_rows(rms_of, like):
    """rms_of (the rows a fused op scales by 1 / rms of: silu_and_mul, rope_write_kv) as a
    contiguous [like's rows, hidden] of like's dtype; None stays None."""
    if rms_of is None:
        return None
    rms = cupy.ascontiguousarray(rms_of)
    if rms.ndim != 2 or rms.shape[0] != like.shape[0] or rms.dtype != like.dtype:
        raise ValueError(f"rms_of {rms.dtype}{tuple(rms.shape)} must be [{like.shape[0]}, hidden] of {like.dtype}")
    return rms


def _rms_args(rms, eps: float) -> tuple:
    """The (stream, hidden, eps) kernel arguments of _rms_rows' rows: a null stream without."""
    if rms is None:
        return np.uint64(0), np.int32(0), np.float32(0.0)
    return rms, np.int32(rms.shape[1]), np.float32(eps)


def _norm_vec_threads(hidden: int) -> int:
    """rms_norm_vec_kernel's threads a row: NORM_VECS vectors of 8 a thread at most, whole warps."""
    return min(1024, 32 * -(-hidden // (8 * _NORM_VECS * 32)))


def _rows(x) -> int:
    return x.size // x.shape[-1] if x.shape[-1] else 0


def bf16_bits(x):
    """float32 -> bf16 bit patterns (uint16), round to nearest even; NaN stays
    NaN. Works on NumPy or CuPy arrays (the module of `x` does the math)."""
    xp = cupy.get_array_module(x)
    x = xp.ascontiguousarray(x, dtype=xp.float32)
    bits = x.view(xp.uint32).astype(xp.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(xp.uint16)
    return xp.where(xp.isnan(x), ((bits >> 16) | 0x40).astype(xp.uint16), rounded)
