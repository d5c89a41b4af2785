"""The attention ops of CudaOps, mixed into it (they launch through
CudaOps._launch): causal GQA attention over one contiguous sequence or the
paged cache. Paged launches of bf16/fp16 prefill rows run the tensor-core
kernel of flash_attention.cu; the rest (decode, fp32, odd head sizes) run
attention.cu's kernel, splitting each row's keys over several blocks when
the launch has few rows. Same meaning as numpy_ops; no host sync.
"""

from __future__ import annotations

import cupy
import numpy as np

from shardline.kernels.cuda_common import (
    _ATTENTION_TARGET_BLOCKS,
    _ATTENTION_THREADS,
    _FLASH_BQ,
    _FLASH_MAX_HEAD_DIM,
    _FLASH_MIN_QUERIES_PER_SEQ,
    _FLASH_THREADS,
    _MAX_ATTENTION_SPLITS,
    _MAX_GRID_Y,
    _MAX_HEAD_DIM,
    _as,
    _ctype,
    _in_place,
    _same_dtype,
    flash_smem_bytes,
)
from shardline.kernels.backend import experimental


class AttentionOps:
    use_flash = "flash" in experimental()   # not yet run on a GPU: opt in

    def _attend(self, q, k_cache, v_cache, tables, seq_lens, query_start_loc, scale, sliding_window, single):
        # single: (num_q, seq_len) of one contiguous sequence, else None (paged)
        ctype = _ctype(q, "q")
        _same_dtype(q, k_cache, v_cache)
        num_heads, head_dim = q.shape[1], q.shape[2]
        num_kv_heads = k_cache.shape[2]
        if k_cache.shape[3] != head_dim or head_dim > _MAX_HEAD_DIM or q.shape[0] > _MAX_GRID_Y:
            raise ValueError(f"attention: head_dim {head_dim} (<= {_MAX_HEAD_DIM}) must match the keys' "
                             f"{k_cache.shape[3]}; at most {_MAX_GRID_Y} query tokens, got {q.shape[0]}")
        if num_kv_heads == 0 or num_heads % num_kv_heads:
            raise ValueError(f"attention: {num_kv_heads} KV heads do not divide {num_heads} query heads")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
        if single is None and self.flash_applies(q, k_cache, v_cache, seq_lens.size):
            return self._flash_prefill(q, k_cache, v_cache, tables, seq_lens, query_start_loc, scale, sliding_window)
        num_q, seq_len = single or (0, 0)
        out = cupy.empty_like(q)
        rows = num_heads * q.shape[0]
        num_splits = max(1, min(_MAX_ATTENTION_SPLITS, _ATTENTION_TARGET_BLOCKS // max(rows, 1)))
        partial = cupy.empty((q.shape[0], num_heads, num_splits, head_dim + 2) if num_splits > 1 else 1,
                             dtype=cupy.float32)
        self._launch("attention_kernel", ctype, (num_heads, q.shape[0], num_splits), (_ATTENTION_THREADS,),
                     (q, k_cache, v_cache, out, tables, np.int32(tables.shape[-1]), np.int32(k_cache.shape[1]),
                      np.int32(single is None), seq_lens, query_start_loc, np.int32(seq_lens.size),
                      np.int32(num_q), np.int32(seq_len), np.int32(num_heads), np.int32(num_kv_heads),
                      np.int32(head_dim), np.float32(scale), np.int32(sliding_window or 0),
                      np.int32(num_splits), partial))
        if num_splits > 1:
            self._launch("attention_combine_kernel", ctype, (num_heads, q.shape[0]), (_ATTENTION_THREADS,),
                         (partial, out, query_start_loc, np.int32(seq_lens.size), np.int32(single is None),
                          np.int32(num_heads), np.int32(head_dim), np.int32(num_splits)))
        return out

    def _allow_flash_shared_memory(self) -> None:
        """The flash kernel needs more shared memory than the default 48 KiB: opt in once,
        up front (never during a CUDA-graph capture), as far as this GPU allows (227 KiB on
        H100, 99 KiB on sm_86/89); head sizes needing more skip the kernel."""
        optin = cupy.cuda.Device(self.device_id).attributes["MaxSharedMemoryPerBlockOptin"]
        self._flash_smem_limit = 0
        for ctype in ("__half", "__nv_bfloat16"):
            kernel = self._functions.get(("flash_prefill_kernel", ctype))
            if kernel is None:
                continue
            # 1 KiB kept for the kernel's static shared memory (640 bytes: its tile scan)
            allowed = min(flash_smem_bytes(_FLASH_MAX_HEAD_DIM), optin - 1024)
            try:
                kernel.max_dynamic_shared_size_bytes = allowed
                self._flash_smem_limit = allowed
            except cupy.cuda.driver.CUDADriverError:   # this GPU refuses: no flash here
                del self._functions["flash_prefill_kernel", ctype]

    def flash_applies(self, q, k_cache, v_cache, num_seqs: int) -> bool:
        """Whether a paged launch runs the tensor-core kernel: bf16 or fp16, head_dim a multiple
        of 16 up to 128, 16-byte aligned rows, and either prefill-like (the G heads of a KV head
        times the queries average a warp's 16 rows a sequence) or a decode batch with at
        least two blocks (sequence, KV head) per multiprocessor. The thresholds are first
        guesses, to be tuned with bench/llm.py."""
        head_dim, num_kv_heads = q.shape[2], k_cache.shape[2]
        group = q.shape[1] // max(num_kv_heads, 1)
        prefill_like = q.shape[0] * group >= _FLASH_MIN_QUERIES_PER_SEQ * max(num_seqs, 1)
        wide_decode = num_seqs * num_kv_heads >= 2 * self._multiprocessors
        return (self.use_flash and ("flash_prefill_kernel", _ctype(q, "q")) in self._functions
                and head_dim % 16 == 0 and head_dim <= _FLASH_MAX_HEAD_DIM and (prefill_like or wide_decode)
                and flash_smem_bytes(head_dim) <= self._flash_smem_limit
                and all(a.data.ptr % 16 == 0 for a in (q, k_cache, v_cache)))

    def _flash_prefill(self, q, k_cache, v_cache, tables, seq_lens, query_start_loc, scale, sliding_window):
        ctype, (num_heads, head_dim), num_kv_heads = _ctype(q, "q"), q.shape[1:], k_cache.shape[2]
        out = cupy.zeros_like(q)   # rows past the last sequence stay zero
        # An upper bound on the tiles of packed (query, head of the group) rows: blocks past the last exit.
        group = num_heads // num_kv_heads
        grid = (-(-q.shape[0] * group // _FLASH_BQ) + seq_lens.size, num_kv_heads)
        self._launch("flash_prefill_kernel", ctype, grid, (_FLASH_THREADS,),
                     (q, k_cache, v_cache, out, tables, np.int32(tables.shape[-1]), np.int32(k_cache.shape[1]),
                      seq_lens, query_start_loc, np.int32(seq_lens.size), np.int32(num_heads),
                      np.int32(num_kv_heads), np.int32(head_dim), np.float32(scale),
                      np.int32(sliding_window or 0)), shared_mem=flash_smem_bytes(head_dim))
        return out

    def attention(self, q, k, v, scale: float, sliding_window: int | None = None):
        """Causal GQA attention for one sequence: q [T, H, D] are the last T
        tokens of k, v [S, KVH, D]. Returns [T, H, D]."""
        q, k, v = (cupy.ascontiguousarray(a) for a in (q, k, v))
        if q.ndim != 3 or k.ndim != 3 or k.shape != v.shape:
            raise ValueError(f"attention: q {q.shape} must be [T, H, D] and k {k.shape}, v {v.shape} [S, KVH, D]")
        if q.shape[0] > k.shape[0]:
            raise ValueError(f"attention: {q.shape[0]} queries but only {k.shape[0]} keys")
        # the sequence as a cache of one block of seq_len rows
        return self._attend(q, k[None], v[None], self._zero_i32, self._zero_i32, self._zero_i32, scale,
                            sliding_window, single=(q.shape[0], k.shape[0]))

    def paged_attention(self, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale: float,
                        sliding_window: int | None = None):
        """Causal attention for a batch of sequences over the paged cache (see
        numpy_ops.paged_attention). block_tables [B, max_blocks], seq_lens [B],
        query_start_loc [B + 1], all int32. Rows of q past query_start_loc[B] come back zero."""
        q = cupy.ascontiguousarray(q)
        tables = _as(block_tables, cupy.int32)
        seq_lens, query_start_loc = _as(seq_lens, cupy.int32).ravel(), _as(query_start_loc, cupy.int32).ravel()
        _in_place(k_cache, v_cache)
        if q.ndim != 3 or k_cache.ndim != 4 or v_cache.shape != k_cache.shape or tables.ndim != 2 \
                or tables.shape[0] != seq_lens.size or query_start_loc.size != seq_lens.size + 1:
            raise ValueError(f"paged_attention shapes: q {q.shape}, caches {k_cache.shape} {v_cache.shape}, "
                             f"block_tables {tables.shape}, seq_lens {seq_lens.shape}, "
                             f"query_start_loc {query_start_loc.shape}")
        return self._attend(q, k_cache, v_cache, tables, seq_lens, query_start_loc, scale, sliding_window, None)
