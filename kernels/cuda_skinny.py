"""The decode-sized GEMMs of CudaOps, mixed into it (they launch through CudaOps._launch):
bf16/fp16 GEMMs of at most skinny_max_rows rows (4; on an H200 2 for weights of 16 MiB or
more: skinny_large_*) run skinny_gemm.cu instead of cuBLAS, K split over 1, 2 or 4 warps of a
block as timed per shape; rms_norm_linear runs the RMSNorm before such a GEMM inside it
(norm_skinny_gemm_kernel) where fused_norm_gemm is on, and rms_norm_qkv_rope a QKV
projection's RoPE and KV-cache write in its epilogue (skinny_gemm_rope_kernel) where
fused_rope_gemm is on; with skinny_blocks_per_sm set, fewer blocks loop over the tiles (the
*_looped kernels). Same meaning as numpy_ops; no host sync.
"""

from __future__ import annotations

import logging
import math

import cupy
import numpy as np

from shardline.kernels.backend import gpu_paths_off
from shardline.kernels.cuda_common import (
    _MAX_GRID_Y,
    _SKINNY_K_SPLITS,
    _SKINNY_MAX_ROWS,
    _SKINNY_THREADS,
    _as,
    _ctype,
    _index,
    _skinny_tiles,
    _vectors,
)
from shardline.kernels.dependent_launch import resident_blocks
from shardline.kernels.gemm_lt import _capturing, _Timer
from shardline.kernels import numpy_ops

log = logging.getLogger(__name__)


class SkinnyGemmOps:
    use_skinny_gemm = "skinny_gemm" not in gpu_paths_off()
    skinny_k_split: int | None = None   # None: timed per shape (_skinny_k_split)
    # At one row the largest split within this fraction of the fastest, or this many seconds, is
    # taken (pick_k_split).
    skinny_split_tie, skinny_split_tie_s = 0.03, 2e-6
    # 0: a block a tile of output features. n > 0: plain and RoPE GEMMs of at least
    # skinny_looped_min_rows rows launch at most n blocks an SM, each looping over tiles (the
    # *_looped kernels), so the whole GEMM is resident from its start (4: the looped kernels'
    # occupancy from 2 rows on at K split 2 or 4, 118-128 registers). Never more than fit an SM at
    # once (the driver's occupancy calculator): past that the rest wait for a second, partial wave
    # (on an H200, Llama-3-8B's GEMMs at 4 rows, 4 fitting: 6.77 ms on 5 an SM against 5.47 capped).
    # At the default 4 the cap changes only kernels of which fewer fit (RoPE at 4 rows and K split
    # 1, 134 registers under nvcc 13.0: 3), not yet measured. Llama-3-8B's step on an H100
    # (bench.decode_ab, K splits retimed, medians in ms at 1 / 2 / 4 rows): a block a tile 5.89 /
    # 6.26 / 7.19, 4 an SM 7.56 / 6.10 / 6.71, 8 an SM 6.00 / 6.10 / 6.70; these defaults 5.90 /
    # 6.11 / 6.78 against 5.90 / 6.27 / 7.19; SmolLM2 moved by under 2%. Below
    # skinny_looped_min_rows rows skinny_blocks_per_sm_few_rows applies instead (per GPU, not
    # capped).
    skinny_blocks_per_sm = 4
    skinny_looped_min_rows = 2
    # Blocks an SM below skinny_looped_min_rows rows (0: a block a tile): per GPU, CudaOps sets
    # few_rows_blocks_per_sm(its name).
    skinny_blocks_per_sm_few_rows = 0
    _skinny_max_rows = _SKINNY_MAX_ROWS
    # Weights of at least skinny_large_bytes run skinny only up to skinny_large_max_rows rows (per
    # GPU, CudaOps sets skinny_large_bytes_for(its name); None: no weight is large).
    skinny_large_bytes: int | None = None
    skinny_large_max_rows = 2
    # RMSNorm fused into the decode GEMM after it (rms_norm_linear), for latency-bound GEMMs:
    # it saves a launch but makes the GEMM's loop read the norm's input, residual and weight
    # with its x. Measured on an H100 (bench.decode_ab, bench/notes/RESULTS.md): SmolLM2's
    # step 13% faster at 1 row, 7% at 2, 10% slower at 4; Llama-3-8B's (QKV 48 MiB) 2% slower
    # at 1 row.
    fused_norm_gemm = "fused_norm_gemm" not in gpu_paths_off()
    fused_norm_max_rows = 2
    fused_norm_max_bytes = 8 << 20
    # RoPE and the KV-cache write in the QKV projection's epilogue (rms_norm_qkv_rope).
    fused_rope_gemm = "fused_rope_gemm" not in gpu_paths_off()
    # A folded RMSNorm (its weight in the GEMM's columns) before a cuBLAS GEMM of at most
    # norm_in_consumer_max_rows rows without a residual to add: no norm kernel; the GEMM reads
    # the stream and the kernel after it (silu_and_mul, rope_write_kv) scales each row by 1 / rms.
    # Each of its blocks sums a row of the stream again, so longer inputs keep the norm kernel.
    norm_in_consumer = "norm_in_consumer" not in gpu_paths_off()
    norm_in_consumer_max_rows = 256

    def _skinny(self, x2, weight, out, accumulate: bool = False, gated: bool = False, k_split: int = 0) -> None:
        num_out, ctype = out.shape[1], _ctype(x2, "x")
        k_split = k_split or self._skinny_k_split(x2, weight, gated)
        template = f"{ctype}, {x2.shape[0]}, {k_split}"
        kernel, grid = self._skinny_grid("skinny_gemm_kernel", template, num_out, gated, k_split, x2.shape[0])
        self._launch(kernel, template, grid, (_SKINNY_THREADS,),
                     (x2, weight, out, np.int32(num_out), np.int32(x2.shape[1]), np.int32(accumulate),
                      np.int32(gated)))

    def expert_linear(self, x, weights, experts, gated: bool = False):
        """numpy_ops.expert_linear in one launch of expert_skinny_gemm_kernel (a grid row a
        pair, its expert read on the device), K split as a one-row GEMM by one expert's weight."""
        if not self.expert_linear_applies(x, weights):
            raise ValueError(f"expert_linear: x {x.dtype}{x.shape} by weights {weights.dtype}{weights.shape} "
                             "is no 16-bit skinny GEMM")
        experts = _as(experts, cupy.int32).ravel()
        (rows, k), pairs = x.shape, experts.size
        if not rows or pairs % rows or pairs > _MAX_GRID_Y:
            raise ValueError(f"expert_linear: {pairs} pairs for {rows} rows (a whole number times, at most "
                             f"{_MAX_GRID_Y})")
        num_out = weights.shape[1] // 2 if gated else weights.shape[1]
        out = cupy.empty((pairs, num_out), dtype=x.dtype)
        k_split = self._skinny_k_split(x[:1], weights[0], gated)
        self._launch("expert_skinny_gemm_kernel", f"{_ctype(x, 'x')}, {k_split}",
                     (_skinny_tiles(num_out, gated, k_split), pairs), (_SKINNY_THREADS,),
                     (x, np.int32(rows), weights, experts, np.int32(weights.shape[0]), np.int64(weights.shape[1] * k),
                      out, np.int32(num_out), np.int32(k), np.int32(gated)))
        return out

    def expert_mlp_applies(self, x, gate_up, down) -> bool:
        """numpy_ops.expert_mlp_applies: both GEMMs 16-bit skinny ones, down's input gate/up's output."""
        return bool(self.expert_linear_applies(x, gate_up) and down.ndim == 3 and down.dtype == x.dtype
                    and down.shape[2] * 2 == gate_up.shape[1] and down.shape[2] % 8 == 0
                    and down.flags.c_contiguous and down.data.ptr % 16 == 0)

    def expert_linear_applies(self, x, weights) -> bool:
        """Where expert_linear runs: where a one-row skinny GEMM by one expert's weight would, the
        16-bit rows and a contiguous stack of weights."""
        return bool(x.ndim == 2 and weights.ndim == 3 and weights.shape[2] == x.shape[1] and x.shape[0]
                    and x.dtype == weights.dtype and x.dtype in (cupy.float16, cupy.uint16)
                    and x.flags.c_contiguous and weights.flags.c_contiguous
                    and ("expert_skinny_gemm_kernel", f"{_ctype(x, 'x')}, 1") in self._functions
                    and self._skinny_applies(x[:1], weights[0]))

    def rms_norm_linear(self, x, norm_weight, eps: float, residual, weight, bias=None, gated: bool = False,
                        folded: bool = False):
        """numpy_ops.rms_norm_linear. Where fused_norm_gemm is on, decode-sized inputs run one
        kernel (norm_skinny_gemm_kernel, the norm streamed with the weights): the new residual
        bitwise rms_norm's, the output within rounding of the two ops' (it is not rounded
        to storage between the norm and the GEMM). A folded norm before a gated GEMM may run in
        silu_and_mul after it (norm_in_consumer)."""
        if folded and gated and weight.shape[0] % 16 == 0 and self._norm_in_consumer(x, residual, weight, bias):
            return self.silu_and_mul(self.linear(x, weight), rms_of=x, eps=eps), x
        if not self._norm_gemm_applies(x, norm_weight, residual, weight, bias, gated):
            return numpy_ops.rms_norm_linear(x, norm_weight, eps, residual, weight, bias, gated, ops=self)
        rows, hidden = x.shape
        norm_args, res_out = self._norm_in(x, norm_weight, eps, residual)
        num_out = weight.shape[0] // 2 if gated else weight.shape[0]
        out = cupy.empty((rows, num_out), dtype=x.dtype)
        if bias is not None:   # added as linear adds it: the GEMM accumulates onto it
            self._fill_rows(out, bias)
        k_split = self._skinny_k_split(x, weight, gated)
        self._launch("norm_skinny_gemm_kernel", f"{_ctype(x, 'x')}, {rows}, {k_split}",
                     (_skinny_tiles(num_out, gated, k_split),), (_SKINNY_THREADS,),
                     (*norm_args, weight, out, np.int32(num_out), np.int32(hidden), np.int32(bias is not None),
                      np.int32(gated)))
        return out, res_out

    def _skinny_grid(self, kernel: str, template: str, num_out: int, gated: bool, k_split: int,
                     rows: int) -> tuple[str, tuple[int]]:
        """(kernel, grid) of a plain or RoPE skinny GEMM: a block a tile, or where that is more
        than skinny_blocks_per_sm blocks an SM (capped at what fits one) or, below
        skinny_looped_min_rows rows, skinny_blocks_per_sm_few_rows, the kernel's *_looped
        variant on that many."""
        tiles = _skinny_tiles(num_out, gated, k_split)
        looped = kernel.replace("_kernel", "_looped_kernel")
        if rows < self.skinny_looped_min_rows:
            per_sm = self.skinny_blocks_per_sm_few_rows
        elif self.skinny_blocks_per_sm:
            per_sm = min(self.skinny_blocks_per_sm, self._resident_blocks(looped, template))
        else:
            per_sm = 0
        blocks = per_sm * self._multiprocessors
        if 0 < blocks < tiles:
            return looped, (blocks,)
        return kernel, (tiles,)

    def _resident_blocks(self, kernel: str, template: str) -> int:
        """Blocks of a skinny kernel instantiation that fit one SM at once (its registers)."""
        key = (kernel, template)
        if key not in self._residency:
            self._residency[key] = resident_blocks(self._functions[key], _SKINNY_THREADS)
        return self._residency[key]

    @staticmethod
    def _norm_in(x, norm_weight, eps: float, residual) -> tuple:
        """The norm_skinny_gemm kernels' first arguments (x, residual, norm_weight, residual_out,
        has_residual, eps: NormIn) and the new residual stream they write (x itself without a
        residual: nothing is written)."""
        res_out = x if residual is None else cupy.empty_like(x)
        return (x, x if residual is None else residual, norm_weight, res_out, np.int32(residual is not None),
                np.float32(eps)), res_out

    def rms_norm_qkv_rope(self, x, norm_weight, eps: float, residual, weight, bias, positions, cos_sin,
                          num_heads: int, k_cache, v_cache, slot_mapping, folded: bool = False):
        """numpy_ops.rms_norm_qkv_rope. Where fused_rope_gemm is on, decode-sized inputs run one
        kernel: the skinny GEMM's outputs go rotated into q and the cache as rope_write_kv_kernel
        writes them (bitwise), the norm streamed with it where rms_norm_linear would fuse it. A
        folded norm before a cuBLAS GEMM may run in rope_write_kv after it (norm_in_consumer)."""
        if folded and self._norm_in_consumer(x, residual, weight, bias):
            q, k, v = numpy_ops.split_qkv(self.linear(x, weight), num_heads, k_cache)
            return self.rope_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, rms_of=x,
                                      eps=eps), x
        if not self._rope_gemm_applies(x, norm_weight, weight, bias, num_heads, cos_sin, k_cache, v_cache):
            return numpy_ops.rms_norm_qkv_rope(x, norm_weight, eps, residual, weight, bias, positions, cos_sin,
                                               num_heads, k_cache, v_cache, slot_mapping, ops=self)
        rows, (kv_heads, head_dim) = x.shape[0], k_cache.shape[2:]
        positions, cos_sin, slots = _index(positions), _as(cos_sin, cupy.float32), _index(slot_mapping)
        if positions.size != rows or slots.size != rows:
            raise ValueError(f"rms_norm_qkv_rope: {positions.size} positions and {slots.size} slots for {rows} "
                             "tokens")
        q = cupy.empty((rows, num_heads, head_dim), dtype=x.dtype)
        k_split = self._skinny_k_split(x, weight, False)
        template = f"{_ctype(x, 'x')}, {rows}, {k_split}"
        gemm = (weight, np.int32(weight.shape[0]), np.int32(x.shape[1]))
        rope = (q, k_cache, v_cache, positions, cos_sin, slots, np.int64(math.prod(k_cache.shape[:2])),
                np.int32(num_heads), np.int32(kv_heads), np.int32(head_dim))
        if self._norm_gemm_applies(x, norm_weight, residual, weight, None, False):
            norm_args, res_out = self._norm_in(x, norm_weight, eps, residual)
            self._launch("norm_skinny_gemm_rope_kernel", template, (_skinny_tiles(weight.shape[0], False, k_split),),
                         (_SKINNY_THREADS,), (*norm_args, *gemm, *rope))
        else:
            normed, res_out = numpy_ops.rms_norm_residual(x, norm_weight, eps, residual, ops=self)
            kernel, grid = self._skinny_grid("skinny_gemm_rope_kernel", template, weight.shape[0], False, k_split,
                                             rows)
            self._launch(kernel, template, grid, (_SKINNY_THREADS,), (normed, *gemm, *rope))
        return q, res_out

    def _rope_gemm_applies(self, x, norm_weight, weight, bias, num_heads: int, cos_sin, k_cache, v_cache) -> bool:
        """Where rms_norm_qkv_rope runs the fused kernel: a bias-free skinny GEMM whose rows are
        the q, k, v heads of the (equal, contiguous) caches, in their dtype."""
        if not (self.fused_rope_gemm and bias is None and x.ndim == 2 and weight.ndim == 2 and k_cache.ndim == 4
                and v_cache.shape == k_cache.shape and x.flags.c_contiguous and weight.flags.c_contiguous
                and k_cache.flags.c_contiguous and v_cache.flags.c_contiguous):
            return False
        kv_heads, head_dim = k_cache.shape[2:]
        return (x.size > 0 and head_dim % 2 == 0 and weight.shape == ((num_heads + 2 * kv_heads) * head_dim, x.shape[1])
                and norm_weight.shape == (x.shape[1],) and cos_sin.ndim == 2 and cos_sin.shape[1] == head_dim
                and all(a.dtype == x.dtype for a in (norm_weight, weight, k_cache, v_cache))
                and self._skinny_applies(x, weight)
                and ("skinny_gemm_rope_kernel", f"{_ctype(x, 'x')}, {x.shape[0]}, 1") in self._functions)

    def _norm_in_consumer(self, x, residual, weight, bias) -> bool:
        """Where a folded RMSNorm runs in the op after its GEMM: no residual or bias, bf16 rows in
        16-byte vectors, at most norm_in_consumer_max_rows of them, a GEMM cuBLAS runs. Not fp16:
        the GEMM's output, rounded before the 1 / rms scale, is rms(x) times the normed one's, and
        a large rms (a "massive activation" token) would overflow fp16's range there."""
        return bool(self.norm_in_consumer and residual is None and bias is None and x.ndim == 2 and weight.ndim == 2
                    and 0 < x.shape[0] <= self.norm_in_consumer_max_rows and x.dtype == weight.dtype == cupy.uint16
                    and x.flags.c_contiguous and _vectors(x.shape[1], x) and not self._skinny_applies(x, weight))

    def _norm_gemm_applies(self, x, norm_weight, residual, weight, bias, gated: bool) -> bool:
        """Where norm_skinny_gemm_kernel runs rms_norm_linear: a skinny GEMM's inputs, 16-bit
        and read in 16-byte vectors, no gated bias, within the fused_norm_max_* bounds."""
        hidden = x.shape[-1]
        rows = [a for a in (x, norm_weight, residual) if a is not None]   # read in 16-byte vectors
        arrays = rows + [a for a in (weight, bias) if a is not None]
        shapes = (x.ndim == 2 and weight.ndim == 2 and weight.shape[0] and weight.shape[1] == hidden
                  and norm_weight.shape == (hidden,)
                  and (residual is None or residual.shape == x.shape)
                  and (bias is None or (not gated and bias.shape == (weight.shape[0],)))
                  and not (gated and weight.shape[0] % 2))
        return bool(self.fused_norm_gemm and shapes and x.size and x.shape[0] <= self.fused_norm_max_rows
                   and weight.nbytes <= self.fused_norm_max_bytes
                   and all(a.dtype == x.dtype and a.flags.c_contiguous for a in arrays) and _vectors(hidden, *rows)
                   and self._skinny_applies(x, weight)
                   and ("norm_skinny_gemm_kernel", f"{_ctype(x, 'x')}, {x.shape[0]}, 1") in self._functions)

    def _skinny_k_split(self, x2, weight, gated: bool) -> int:
        """Warps a skinny GEMM splits K over: skinny_k_split where set, else pick_k_split's choice
        from _SKINNY_K_SPLITS for the shape, timed (L2 flushed, as gemm_lt times cuBLASLt) the
        first time the shape comes on a stream that does not capture; 1 until then. The split
        sets the order of the sum, so its bits may differ between processes (as cuBLASLt's
        timed algorithms may)."""
        if self.skinny_k_split:
            if self.skinny_k_split not in _SKINNY_K_SPLITS:
                raise ValueError(f"skinny_k_split must be one of {_SKINNY_K_SPLITS}, got {self.skinny_k_split!r}")
            return self.skinny_k_split
        key = (x2.shape[0], weight.shape[0], x2.shape[1], gated, x2.dtype.str)
        if key not in self._skinny_splits:
            if _capturing():
                return 1
            out = cupy.empty((x2.shape[0], weight.shape[0] // 2 if gated else weight.shape[0]), dtype=x2.dtype)
            timer = _Timer(weight.nbytes, cupy.cuda.Device().attributes["L2CacheSize"])
            seconds = {split: timer.median_s(lambda: self._skinny(x2, weight, out, gated=gated, k_split=split))
                       for split in _SKINNY_K_SPLITS}
            self._skinny_splits[key] = pick_k_split(seconds, x2.shape[0], self.skinny_split_tie,
                                                    self.skinny_split_tie_s)
            log.info("skinny GEMM T=%d N=%d K=%d%s: K in %d warps (us by split: %s)", *key[:3],
                     " gated" if gated else "", self._skinny_splits[key],
                     ", ".join(f"{k} {1e6 * v:.1f}" for k, v in seconds.items()))
        return self._skinny_splits[key]

    @property
    def skinny_max_rows(self) -> int:
        """GEMMs of at most this many rows run skinny_gemm.cu (large weights: at most
        skinny_large_max_rows)."""
        return self._skinny_max_rows

    @skinny_max_rows.setter
    def skinny_max_rows(self, rows: int) -> None:
        if not (isinstance(rows, int) and 0 <= rows <= _SKINNY_MAX_ROWS):
            raise ValueError(f"skinny_max_rows must be 0 to {_SKINNY_MAX_ROWS} (the rows skinny_gemm.cu is "
                             f"built for), got {rows!r}")
        self._skinny_max_rows = rows

    def _skinny_applies(self, x2, weight) -> bool:
        """Decode-sized bf16/fp16 GEMMs (at most skinny_max_rows rows) run skinny_gemm.cu instead
        of cuBLAS."""
        key = ("skinny_gemm_kernel", f"{_ctype(x2, 'x')}, {x2.shape[0]}, 1")   # every split or none
        large = self.skinny_large_bytes is not None and weight.nbytes >= self.skinny_large_bytes
        max_rows = min(self.skinny_max_rows, self.skinny_large_max_rows) if large else self.skinny_max_rows
        return (self.use_skinny_gemm and x2.shape[0] <= max_rows and x2.shape[1] % 8 == 0
                and key in self._functions and x2.data.ptr % 16 == 0 and weight.data.ptr % 16 == 0)


def few_rows_blocks_per_sm(device_name: str) -> int:
    """skinny_blocks_per_sm_few_rows for a GPU. Llama-3-8B's batch-1 step (bench.decode_ab, K
    splits retimed, ms of two runs): on an H200 a block a tile 4.83 / 4.82, looped on 8 an SM
    4.77 / 4.75, on 16 an SM 4.66 / 4.66; on an H100 16 an SM took 5.95 against 5.89 (its
    one-tile kernels fit 6 blocks an SM, the looped ones 5; the H200 streams its weights 1.4x
    faster, so more of them must be in flight at once). Not capped at what fits: with each
    block's next tile loaded ahead (116 registers, 4 blocks an SM at K split 4), the H200's
    synthetic batch-1 step took 4.47 ms on 16 an SM against 4.52 on the 4 that fit
    (bench.step_parts)."""
    return 16 if "H200" in device_name else 0


def skinny_large_bytes_for(device_name: str) -> int | None:
    """skinny_large_bytes for a GPU: on an H200 16 MiB (skinny_large_max_rows 2 rows there).
    There Llama-3-8B's decode step (bench.decode_ab, one engine, ms at 3 / 4 rows) took 4.95 /
    4.94 with its weights (33-1002 MiB) on cuBLAS, 6.01-6.05 / 6.04-6.14 with all of them
    skinny (a block a tile 6.43, 8 blocks an SM 6.03, K split 4 6.05-6.08), 5.05-5.09 with
    only o_proj (32 MiB) skinny; at 2 rows skinny 4.79 against cuBLAS 4.90. SmolLM2's (weights
    of 0.7-3.5 MiB, its LM head 54 MiB) at 3 / 4 rows: 0.74-0.77 / 0.74-0.82 so, 0.79-0.81 /
    0.77-0.84 with the head skinny too, 1.11-1.12 / 1.12-1.13 with every weight on cuBLAS
    (bench/notes/skinny_large_bytes_ab_h200.json). On an H100 the skinny GEMMs were chosen up
    to 4 rows for every weight (None), where cuBLAS has not been timed against them since."""
    return 16 << 20 if "H200" in device_name else None


def pick_k_split(seconds: dict[int, float], rows: int, tie: float, tie_s: float = 0.0) -> int:
    """The K split to keep from each split's time for a GEMM run alone: the fastest, but at one
    row the largest within `tie` of the fastest, or within `tie_s` seconds where that is more.
    There the shorter warps of a larger split end the kernel sooner in a captured step, where the
    next kernel starts during its tail (dependent launches), which timing it alone does not see:
    on an H100, Llama-3-8B's batch-1 step took 5.90-5.93 ms with every split 4 against 6.00-6.01
    with the fastest alone (ties within 2% there); on an H200 (session 31) every process whose
    10 us o projection kept split 1 or 2 stepped at 4.37-4.41 ms, those with 4 at 4.19-4.22. At
    2 and 4 rows the fastest alone was the better choice (bench/notes/RESULTS.md). Until _Timer queued
    its reps behind a spin (session 32) they timed the host's launches too: the o projection
    timed 16-52 us from process to process and a third of the processes kept split 1 or 2 for it
    or for the down projection, whatever the tie (2, 4 or 8 us); with the spin every split timed
    steadily (15.6-17.1 us) and three processes of three kept 4 everywhere (4.23 ms)."""
    fastest = min(seconds.values())
    if rows == 1:
        return max(split for split, s in seconds.items() if s <= max(fastest * (1 + tie), fastest + tie_s))
    return min(seconds, key=seconds.get)
