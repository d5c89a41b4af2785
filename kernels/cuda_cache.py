"""The KV-cache ops of CudaOps, mixed into it (they launch through CudaOps._launch):
new keys and values into their slots (with rope: rope_write_kv), copy-on-write of
blocks, and gathering / scattering cache rows for the KV hand-off. Same meaning as
numpy_ops; no host sync. And the other copy kernel of elementwise.cu: a graphed decode
step's inputs read from pinned host memory (stage_decode_inputs; CUDA graphs only, no
numpy_ops twin).
"""

from __future__ import annotations

import math

import cupy
import numpy as np

from shardline.kernels.cuda_common import (
    _MAX_GRID_Y,
    _THREADS,
    _as,
    _ctype,
    _in_place,
    _index,
    _rms_args,
    _rms_rows,
    _row_threads,
    _row_word,
    _same_dtype,
    _token_rows,
    _vectors,
    _word,
)


class CacheOps:
    def _check_cache(self, k, v, k_cache, v_cache) -> None:
        _in_place(k_cache, v_cache)
        _same_dtype(k_cache, k, v, v_cache)
        if k_cache.ndim != 4 or v_cache.shape != k_cache.shape or k.shape != v.shape \
                or k.shape[1:] != k_cache.shape[2:]:
            raise ValueError(f"k {k.shape}, v {v.shape} must be [T, kv_heads, head_dim] of caches "
                             f"{k_cache.shape}, {v_cache.shape} [num_blocks, block_size, kv_heads, head_dim]")

    def write_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        """k, v [T, kv_heads, head_dim] into their slots (slot_mapping [T] int64), in place."""
        k, v, slots = cupy.ascontiguousarray(k), cupy.ascontiguousarray(v), _index(slot_mapping)
        self._check_cache(k, v, k_cache, v_cache)
        if slots.size != k.shape[0]:
            raise ValueError(f"slot_mapping has {slots.size} slots for {k.shape[0]} tokens")
        self._launch("write_kv_kernel", _word(k), (k.shape[0],), (_THREADS,),
                     (k, v, k_cache, v_cache, slots, np.int64(math.prod(k_cache.shape[:2])),
                      np.int64(math.prod(k.shape[1:]))))

    def rope_write_kv(self, q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, rms_of=None,
                      eps: float = 0.0):
        """rope on q and k, rotated k and v into the cache; returns the rotated q.
        One kernel: the rotated k goes straight to its slot. q, k, v may be views whose
        tokens are strided (column ranges of one QKV projection): no copies then. rms_of
        [tokens, hidden]: q, k, v scaled by 1 / rms of its rows first (numpy_ops.rope_write_kv)."""
        (q, q_stride), (k, k_stride), (v, v_stride) = (_token_rows(a) for a in (q, k, v))
        q, k, positions, cos_sin = self._check_rope(q, k, positions, cos_sin, contiguous=False)
        slots = _index(slot_mapping)
        self._check_cache(k, v, k_cache, v_cache)
        if slots.size != q.shape[0]:
            raise ValueError(f"slot_mapping has {slots.size} slots for {q.shape[0]} tokens")
        q_out = cupy.empty_like(q)
        num_heads, num_kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
        pairs = (num_heads + num_kv_heads) * head_dim // 2
        # eight pairs a thread where rows, token strides and the table take 16-byte vectors
        rms = _rms_rows(rms_of, q)
        vec = head_dim % 16 == 0 and _vectors(8, q, k, v, q_out, k_cache, v_cache) \
            and cos_sin.data.ptr % 16 == 0 and all(stride % 8 == 0 for stride in (q_stride, k_stride, v_stride)) \
            and (rms is None or _vectors(rms.shape[1], rms))
        self._launch("rope_write_kv_kernel", f"{_ctype(q, 'q')}, {8 if vec else 1}", (q.shape[0],),
                     _row_threads(pairs // 2 if vec else pairs),
                     (q, k, v, q_out, k_cache, v_cache, positions, cos_sin, slots,
                      np.int64(math.prod(k_cache.shape[:2])), np.int32(num_heads), np.int32(num_kv_heads),
                      np.int32(head_dim), np.int64(q_stride), np.int64(k_stride), np.int64(v_stride),
                      *_rms_args(rms, eps)))
        return q_out

    def copy_blocks(self, k_cache, v_cache, block_copies) -> None:
        """Copy-on-write: block_copies [C, 2] int32 (src, dst), in place."""
        _in_place(k_cache, v_cache)
        _same_dtype(k_cache, v_cache)
        copies = _as(block_copies, cupy.int32)
        if copies.ndim != 2 or copies.shape[1] != 2 or v_cache.shape != k_cache.shape:
            raise ValueError(f"block_copies {copies.shape} must be [C, 2] over equal caches")
        self._launch("copy_blocks_kernel", _word(k_cache), (copies.shape[0], 2), (_THREADS,),
                     (k_cache, v_cache, copies, np.int64(k_cache.shape[0]), np.int64(math.prod(k_cache.shape[1:]))))

    def gather_cache_rows(self, caches, slots):
        """caches: C equal [num_blocks, block_size, kv_heads, head_dim] arrays (e.g. every
        layer's K, then V); slots [S] int64 -> [C, S, kv_heads, head_dim], one launch."""
        index, table = _index(slots), self._pointer_table(caches)
        out = cupy.empty((len(caches), index.size, *caches[0].shape[2:]), dtype=caches[0].dtype)
        word, row_words = _row_word(math.prod(caches[0].shape[2:]) * out.itemsize)
        self._launch("gather_cache_rows_kernel", word, (index.size, len(caches)), (_THREADS,),
                     (table, index, out, np.int64(index.size), np.int64(math.prod(caches[0].shape[:2])),
                      np.int64(row_words)))
        return out

    def scatter_cache_rows(self, caches, slots, rows) -> None:
        """The inverse: rows [C, S, kv_heads, head_dim] into the caches at `slots`, in place."""
        index, table = _index(slots), self._pointer_table(caches)
        rows = cupy.ascontiguousarray(rows)
        if rows.shape != (len(caches), index.size, *caches[0].shape[2:]) or rows.dtype != caches[0].dtype:
            raise ValueError(f"rows {rows.shape} {rows.dtype} do not fit {len(caches)} caches of "
                             f"{caches[0].shape} {caches[0].dtype} at {index.size} slots")
        word, row_words = _row_word(math.prod(caches[0].shape[2:]) * rows.itemsize)
        self._launch("scatter_cache_rows_kernel", word, (index.size, len(caches)), (_THREADS,),
                     (table, index, rows, np.int64(index.size), np.int64(math.prod(caches[0].shape[:2])),
                      np.int64(row_words)))

    def _pointer_table(self, caches):
        """The caches' device addresses as a device array, kept per set of caches
        (an engine's KV cache is allocated once, so this uploads once)."""
        addresses = tuple(c.data.ptr for c in caches)
        key = (caches[0].shape, caches[0].dtype.str, addresses)
        table = self._pointer_tables.get(key)
        if table is None:
            first = caches[0]
            if len(caches) > _MAX_GRID_Y or any(c.shape != first.shape or c.dtype != first.dtype
                                                or not c.flags.c_contiguous for c in caches):
                raise ValueError("caches must be at most 65535 contiguous arrays of one shape and dtype")
            table = self._pointer_tables[key] = cupy.asarray(np.array(addresses, dtype=np.uint64))
        return table

    def stage_decode_inputs(self, slot: np.ndarray, dst, tokens_at: int, sources_at: int, rows: int,
                            table_at: int, table_width: int) -> None:
        """dst (uint8 on the device) from the pinned host `slot` laid out as it, with the pending
        token ids from the previous step's tokens and only the block-table columns the slot's
        header says are in use (elementwise.cu's stage_decode_inputs_kernel): a captured decode
        step's first kernel. The tables, rows x table_width int32 from byte table_at, end the
        layout. An ordinary launch, since the step's first kernel has no kernel before it to
        overlap. The tables' rows are whole 16-byte units (table_width a multiple of 4)."""
        if slot.nbytes != dst.nbytes or slot.ctypes.data % 16 or dst.nbytes % 16 or dst.data.ptr % 16 \
                or tokens_at % 16 or sources_at % 16 or table_at % 16 or table_width % 4:
            raise ValueError(f"stage_decode_inputs: a slot of {slot.nbytes} bytes into {dst.nbytes}, token ids at "
                             f"{tokens_at}, sources at {sources_at}, tables at {table_at} of {table_width} "
                             "columns: 16-byte aligned and equal sizes")
        if not max(tokens_at + 8 * rows, sources_at + 4 * rows, 24) <= table_at <= dst.nbytes - 4 * rows * table_width:
            raise ValueError(f"stage_decode_inputs: the header, token ids and sources of {rows} rows must come "
                             f"before the tables at {table_at}, and {rows} x {table_width} tables end the "
                             f"{dst.nbytes} bytes")
        units = dst.nbytes // 16   # few large blocks: each reads the slot's header once (elementwise.cu)
        self._functions["stage_decode_inputs_kernel", None]((min(8, -(-max(units, rows) // 1024)),), (1024,), (
            np.uint64(slot.ctypes.data), dst, np.int64(tokens_at), np.int64(sources_at), np.int32(rows),
            np.int64(table_at), np.int32(table_width)))
