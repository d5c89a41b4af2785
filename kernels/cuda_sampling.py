"""The sampling ops of CudaOps (penalties, the sampling kernel, its uniforms),
mixed into it: they launch through CudaOps._launch. Same meaning as
numpy_ops; no host sync, so they capture into a CUDA graph.
"""

from __future__ import annotations

import cupy
import numpy as np

from shardline.kernels.cuda_common import _SAMPLE_THREADS, _THREADS, _as, _ctype, _grid_1d

_SAMPLE_MAX_SLICE = 1 << 18   # logits a block of sample_kernel may take: its low histogram sums do not carry out


class SamplingOps:
    def apply_penalties(self, logits, prompt_ids, prompt_lens, output_ids, output_lens,
                        repetition, presence, frequency):
        """numpy_ops.apply_penalties: ids [S, P] / [S, O] int32 padded past their
        lengths, per-row float32 factors. Returns new float32 logits [S, vocab]."""
        logits = cupy.ascontiguousarray(logits)
        ctype = _ctype(logits, "logits")
        rows, vocab = logits.shape
        prompt_ids, output_ids = _as(prompt_ids, cupy.int32), _as(output_ids, cupy.int32)
        per_row = [_as(a, d).ravel() for a, d in ((prompt_lens, cupy.int32), (output_lens, cupy.int32),
                   (repetition, cupy.float32), (presence, cupy.float32), (frequency, cupy.float32))]
        if prompt_ids.ndim != 2 or output_ids.ndim != 2 or any(a.size != rows for a in per_row) \
                or prompt_ids.shape[0] != rows or output_ids.shape[0] != rows:
            raise ValueError(f"apply_penalties: {rows} rows of logits, ids {prompt_ids.shape} / "
                             f"{output_ids.shape}, per-row arrays {[a.size for a in per_row]}")
        marks = cupy.zeros((rows, vocab), dtype=cupy.int32)
        self._launch("penalty_counts_kernel", None, (rows if vocab else 0,), (_THREADS,),
                     (prompt_ids, per_row[0], np.int32(prompt_ids.shape[1]), output_ids, per_row[1],
                      np.int32(output_ids.shape[1]), marks, np.int32(vocab)))
        out = cupy.empty((rows, vocab), dtype=cupy.float32)
        self._launch("apply_penalties_kernel", ctype, _grid_1d(out.size), (_THREADS,),
                     (logits, marks, *per_row[2:], out, np.int64(out.size), np.int32(vocab)))
        return out

    def sample(self, logits, temperature, top_k, top_p, seeds, offsets, min_p=None, publish=None):
        """One int32 token per row; numpy_ops.sample's meaning, no host sync.
        temperature, top_p, min_p float32; top_k int32; seeds uint64; offsets int64 ([batch] each).
        `publish`: an int64 device array whose first word holds the address of pinned host memory
        (or 0) where the kernel writes the tokens too."""
        logits = cupy.ascontiguousarray(logits)
        ctype = _ctype(logits, "logits")
        if logits.ndim != 2:
            raise ValueError(f"logits must be [batch, vocab], got {logits.shape}")
        batch, vocab = logits.shape
        if -(-vocab // (8 * self._sample_blocks)) * 8 > _SAMPLE_MAX_SLICE:
            raise ValueError(f"sample: a vocabulary of {vocab} is more than {self._sample_blocks} blocks of "
                             f"{_SAMPLE_MAX_SLICE} logits (sampling.cu's 32-bit histogram sums)")
        min_p = cupy.zeros(batch, dtype=cupy.float32) if min_p is None else min_p
        params = [_as(p, d).ravel() for p, d in ((temperature, cupy.float32), (top_k, cupy.int32),
                  (top_p, cupy.float32), (seeds, cupy.uint64), (offsets, cupy.int64), (min_p, cupy.float32))]
        if any(p.size != batch for p in params):
            raise ValueError(f"sampling parameters must each have {batch} entries, got {[p.size for p in params]}")
        out = cupy.empty(batch, dtype=cupy.int32)
        self._launch("sample_kernel", ctype, (batch * self._sample_blocks if vocab else 0,), (_SAMPLE_THREADS,),
                     (logits, np.int32(vocab), *params, out, np.int32(batch),
                      np.uint64(0) if publish is None else _as(publish, cupy.int64)))
        return out

    def sampling_uniform(self, seeds, offsets, count: int):
        """[batch, count] float32: the uniforms `sample` draws for each row
        (sampling_rng.uniform on the device; for tests)."""
        seeds, offsets = _as(seeds, cupy.uint64).ravel(), _as(offsets, cupy.int64).ravel()
        if seeds.size != offsets.size:
            raise ValueError(f"seeds ({seeds.size}) and offsets ({offsets.size}) differ in length")
        out = cupy.empty((seeds.size, count), dtype=cupy.float32)
        self._launch("sampling_uniform_kernel", None, (seeds.size if count else 0,), (_THREADS,),
                     (seeds, offsets, out, np.int32(count)))
        return out
