"""The attention ops of CudaOps, mixed into it (they launch through
CudaOps._launch): causal GQA attention over one contiguous sequence or the
paged cache. Paged bf16/fp16 launches of the head sizes the tensor-core kernels
are built for run them: decode steps (a few rows a sequence) flash_decode.cu,
prefill and mixed launches (at least 64 packed rows a sequence on average)
flash_prefill_sm90.cu on sm_90 devices (head sizes 64 and 128, q 16-byte aligned;
128-row tiles), else flash_attention.cu (or flash_prefill.cu where
prefill_rows_per_warp is 32); the rest (fp32, other head sizes, one contiguous
sequence) run attention.cu's kernel.
Both split each row's keys over several blocks when the launch has few rows.
Same meaning as numpy_ops; no host sync.
"""

from __future__ import annotations

import math

import cupy
import numpy as np

from shardline.kernels.cuda_common import (
    _ATTENTION_TARGET_BLOCKS,
    _ATTENTION_THREADS,
    _FLASH_DECODE_MIN_SPLIT_KEYS,
    _FLASH_DECODE_ROWS,
    _FLASH_DECODE_SPLIT_TARGET,
    _FLASH_DECODE_TILES,
    _FLASH_HEAD_DIMS,
    _FLASH_MAX_SPLITS,
    _FLASH_PREFILL_ROWS,
    _FLASH_SM90_ROWS,
    _FLASH_SM90_THREADS,
    _FLASH_THREADS,
    _MAX_ATTENTION_SPLITS,
    _MAX_GRID_Y,
    _MAX_HEAD_DIM,
    _as,
    _ctype,
    _in_place,
    _same_dtype,
    flash_decode_smem_bytes,
    flash_decode_template,
    flash_prefill_sm90_smem_bytes,
    flash_prefill_smem_bytes,
    flash_smem_bytes,
)
from shardline.kernels.backend import gpu_paths_off


class AttentionOps:
    use_flash = "flash" not in gpu_paths_off()
    use_flash_decode = "flash_decode" not in gpu_paths_off()
    decode_tiles = _FLASH_DECODE_TILES   # ((keys, stages, warps), below this many blocks an SM), ...
    decode_split_target = _FLASH_DECODE_SPLIT_TARGET
    # flash_decode gives each split at least this many keys (in whole tiles), so short contexts
    # fill fewer splits than the launch has (bench/notes/RESULTS.md, twenty-first session).
    decode_min_split_keys = _FLASH_DECODE_MIN_SPLIT_KEYS
    # Launches told that every sequence has one query (one_query_each) find their tiles
    # without reading query_start_loc, and launch no block past them but the padding's.
    decode_one_query_tiles = True
    # flash_decode reads a split's first block-table entries with seq_lens, guessing where the
    # split starts (FdTableAhead); off, it looks them up after its key range. A launch
    # argument: captured graphs keep the setting they were captured with.
    decode_table_ahead = True
    # Prefill launches give each warp 16 rows (flash_attention_kernel, KW = 1) or 32, two m-tiles
    # sharing every K/V fragment (flash_prefill_kernel). On an H200, one causal sequence, heads
    # first: 32 took 3% longer at 2048 tokens, 1.4% less at 4096 and 4% less at 8192
    # (bench/notes/RESULTS.md, twenty-third session).
    prefill_rows_per_warp = 16
    # On sm_90 devices prefill launches of head size 64 or 128 run flash_prefill_sm90.cu (warpgroup
    # mma, 128 rows a block) where it compiled; off, the kernels above.
    prefill_sm90 = "flash_sm90" not in gpu_paths_off()
    # Prefill and mixed launches start every KV head's longest tiles before any head's shorter
    # ones (flash_block_tile); off, head by head. A launch argument, as decode_table_ahead.
    prefill_heads_first = True

    def _attend(self, q, k_cache, v_cache, tables, seq_lens, query_start_loc, scale, sliding_window, single,
                one_query_each: bool = False):
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
        # The flash kernels take each tile's max over unscaled scores: a positive scale only.
        if single is None and scale > 0 and self.flash_applies(q, k_cache, v_cache, seq_lens.size):
            return self._flash(q, k_cache, v_cache, tables, seq_lens, query_start_loc, scale, sliding_window,
                               one_query_each)
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
        """The flash kernels need more shared memory than the default 48 KiB: opt in once,
        up front (never during a CUDA-graph capture); an instantiation needing more than
        this GPU allows (227 KiB on H100, 99 KiB on sm_86/89) is dropped."""
        optin = cupy.cuda.Device(self.device_id).attributes["MaxSharedMemoryPerBlockOptin"]
        flash = ("flash_attention_kernel", "flash_decode_kernel", "flash_prefill_kernel", "flash_prefill_sm90_kernel")
        for key in [key for key in self._functions if key[0] in flash]:
            parts = [part.strip() for part in key[1].split(",")]   # "T, D, KW", "T, D, BK, STAGES, KW" or "T, D"
            head_dim = int(parts[1])
            need = (flash_smem_bytes(head_dim, int(parts[2])) if key[0] == "flash_attention_kernel"
                    else flash_prefill_smem_bytes(head_dim) if key[0] == "flash_prefill_kernel"
                    else flash_prefill_sm90_smem_bytes(head_dim) if key[0] == "flash_prefill_sm90_kernel"
                    else flash_decode_smem_bytes(head_dim, tuple(int(part) for part in parts[2:])))
            try:   # 2 KiB kept for the kernel's static shared memory (about 1 KiB: its tile scan)
                if need > optin - 2048:
                    raise ValueError(need)
                self._functions[key].max_dynamic_shared_size_bytes = need
            except (ValueError, cupy.cuda.driver.CUDADriverError):   # this GPU refuses: not this shape
                del self._functions[key]

    def flash_applies(self, q, k_cache, v_cache, num_seqs: int) -> bool:
        """Whether a paged launch runs the tensor-core kernel: bf16 or fp16, a head size it is
        built for, 16-byte aligned caches of fewer than 2^31 token slots (the kernels' int rows)."""
        head_dim = q.shape[2]
        return (self.use_flash and head_dim in _FLASH_HEAD_DIMS and k_cache.shape[0] * k_cache.shape[1] < 2 ** 31
                and ("flash_attention_kernel", f"{_ctype(q, 'q')}, {head_dim}, 4") in self._functions
                and ("flash_attention_kernel", f"{_ctype(q, 'q')}, {head_dim}, 1") in self._functions
                and all(a.data.ptr % 16 == 0 for a in (k_cache, v_cache)))

    def _decode_tile(self, q, num_seqs: int, num_kv_heads: int) -> tuple | None:
        """flash_decode_kernel's (keys, stages, warps) for a launch of q over num_seqs sequences;
        None where its rows are not a decode step's, or the kernel is off or has no instantiation
        this GPU can run (16x3x8 needs 204 KiB of shared memory at head size 128)."""
        rows = q.shape[0] * (q.shape[1] // num_kv_heads)
        if rows > _FLASH_DECODE_ROWS * (num_seqs + 1) or not self.use_flash_decode:
            return None
        blocks_per_sm = max(num_seqs, -(-rows // _FLASH_DECODE_ROWS)) * num_kv_heads / self._multiprocessors
        # the table's tile for this many blocks an SM, or the next one this GPU has shared memory for
        ctype = _ctype(q, "q")
        for tile, bound in self.decode_tiles:
            if blocks_per_sm < bound and ("flash_decode_kernel",
                                          flash_decode_template(ctype, q.shape[2], tile)) in self._functions:
                return tile
        return None

    def _flash(self, q, k_cache, v_cache, tables, seq_lens, query_start_loc, scale, sliding_window, one_query_each):
        ctype, (num_heads, head_dim), num_kv_heads = _ctype(q, "q"), q.shape[1:], k_cache.shape[2]
        num_seqs, rows = seq_lens.size, q.shape[0] * (num_heads // num_kv_heads)
        decode_tile = self._decode_tile(q, num_seqs, num_kv_heads)
        if decode_tile is not None:
            name, template = "flash_decode_kernel", flash_decode_template(ctype, head_dim, decode_tile)
            tile_rows, target, threads = _FLASH_DECODE_ROWS, self.decode_split_target, 32 * decode_tile[2]
            smem = flash_decode_smem_bytes(head_dim, decode_tile)
        else:
            key_warps = 1 if rows >= _FLASH_PREFILL_ROWS * max(num_seqs, 1) else 4
            name, template, tile_rows, target = "flash_attention_kernel", f"{ctype}, {head_dim}, {key_warps}", \
                64 // key_warps, 2
            smem, threads = flash_smem_bytes(head_dim, key_warps), _FLASH_THREADS
            if self.prefill_rows_per_warp not in (16, 32):
                raise ValueError(f"prefill_rows_per_warp must be 16 or 32, got {self.prefill_rows_per_warp!r}")
            if key_warps == 1 and self.prefill_rows_per_warp == 32 and q.data.ptr % 16 == 0 \
                    and ("flash_prefill_kernel", f"{ctype}, {head_dim}") in self._functions:   # Q in 16-byte loads
                name, template, tile_rows = "flash_prefill_kernel", f"{ctype}, {head_dim}", 128
                smem = flash_prefill_smem_bytes(head_dim)
            if key_warps == 1 and self.prefill_sm90 and q.data.ptr % 16 == 0 \
                    and ("flash_prefill_sm90_kernel", f"{ctype}, {head_dim}") in self._functions:
                name, template, tile_rows = "flash_prefill_sm90_kernel", f"{ctype}, {head_dim}", _FLASH_SM90_ROWS
                smem, threads = flash_prefill_sm90_smem_bytes(head_dim), _FLASH_SM90_THREADS
        # An upper bound on the tiles of packed (query, head of the group) rows, plus one: blocks past
        # the last tile exit, and one of them zeroes the rows past the last sequence. The splits fill
        # the SMs at `target` blocks an SM for that bound. A decode launch told that every sequence
        # has one query knows its tiles (ceil(group / 8) a sequence) and launches only those; its
        # splits stay those of the bound (about 1.4-2 times its tiles at one tile a sequence), which
        # measured faster than filling the SMs for its true tiles (Llama-3-8B, batch 4 and 16).
        bound = -(-rows // tile_rows) + num_seqs
        splits = max(1, min(_FLASH_MAX_SPLITS, math.ceil(target * self._multiprocessors / (bound * num_kv_heads))))
        one_query = bool(one_query_each and decode_tile is not None and self.decode_one_query_tiles)
        # (a decode graph has no padding rows: then no block past its tiles at all)
        tiles = max(1, num_seqs * -(-(num_heads // num_kv_heads) // tile_rows) + (q.shape[0] > num_seqs)) \
            if one_query else bound + 1
        if (bound + 1) * num_kv_heads > self._flash_counters.size:   # one counter per (tile, KV head) to split
            splits = 1
        out = cupy.empty_like(q)
        partial = cupy.empty((q.shape[0], num_heads, splits, head_dim + 2) if splits > 1 else 1, dtype=cupy.float32)
        args = (q, k_cache, v_cache, out, partial, tables, np.int32(tables.shape[-1]), np.int32(k_cache.shape[1]),
                seq_lens, query_start_loc, np.int32(num_seqs), np.int32(num_heads), np.int32(num_kv_heads),
                np.float32(scale), np.int32(sliding_window or 0), np.int32(splits), self._flash_counters,
                np.int32(q.shape[0]))
        if decode_tile is not None:   # each split's fewest key tiles; skip the tile lookup; table ahead
            args += (np.int32(max(1, -(-self.decode_min_split_keys // decode_tile[0]))), np.int32(one_query),
                     np.int32(bool(self.decode_table_ahead) and tables.shape[-1] > 0))
        else:
            args += (np.int32(bool(self.prefill_heads_first)),)
        self._launch(name, template, (tiles, num_kv_heads, splits), (threads,), args, shared_mem=smem)
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
                        sliding_window: int | None = None, one_query_each: bool = False):
        """Causal attention for a batch of sequences over the paged cache (see
        numpy_ops.paged_attention). block_tables [B, max_blocks], seq_lens [B],
        query_start_loc [B + 1], all int32. Rows of q past query_start_loc[B] come back zero.
        one_query_each promises query_start_loc is 0, 1, ..., B (a decode step's; not checked
        here, since it lives on the device): flash_decode then reads no tile table."""
        q = cupy.ascontiguousarray(q)
        tables = _as(block_tables, cupy.int32)
        seq_lens, query_start_loc = _as(seq_lens, cupy.int32).ravel(), _as(query_start_loc, cupy.int32).ravel()
        _in_place(k_cache, v_cache)
        if q.ndim != 3 or k_cache.ndim != 4 or v_cache.shape != k_cache.shape or tables.ndim != 2 \
                or tables.shape[0] != seq_lens.size or query_start_loc.size != seq_lens.size + 1:
            raise ValueError(f"paged_attention shapes: q {q.shape}, caches {k_cache.shape} {v_cache.shape}, "
                             f"block_tables {tables.shape}, seq_lens {seq_lens.shape}, "
                             f"query_start_loc {query_start_loc.shape}")
        return self._attend(q, k_cache, v_cache, tables, seq_lens, query_start_loc, scale, sliding_window, None,
                            one_query_each)
