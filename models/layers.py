"""Building blocks shared by the model files: norms, attention, MLPs,
vocab-parallel embedding and LM head (mixture-of-experts layers: moe.py).

Layers hold backend arrays and call `backend.ops`; they never branch on the
backend and never keep per-step state. Under tensor parallelism each layer
holds its rank's slice and does its own collective (`TensorParallel`):
column-parallel projections need none, row-parallel ones (attention output,
MLP down) all-reduce once, with their bias added after the reduction.
Per-step metadata arrives as an argument: `positions` and an attention
context (AttentionContext) with three methods,

    attend(layer_index, q, k, v, positions, cos_sin) -> out
        q [num_tokens, num_heads, head_dim], k/v [num_tokens, num_kv_heads,
        head_dim] for this step's tokens (this rank's heads), before RoPE;
        cos_sin is the model's rotary table (None for models without RoPE).
        The context applies RoPE, stores k/v in its KV cache (one fused
        kernel where the backend has it) and returns attention over each
        whole sequence, [num_tokens, num_heads, head_dim].
    paged_cache(layer_index) -> (k_cache, v_cache, slot_mapping) or None
        Where not None, an RMSNorm model with RoPE projects, rotates and
        stores k/v itself (ops.rms_norm_qkv_rope: one kernel for decode-sized
        steps on CUDA), then calls
    attend_rotated(layer_index, q) -> out
        attention of the rotated q over that cache.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from shardline.kernels.backend import Backend
from shardline.kernels.rope import rope_cos_sin
from shardline.models.config import ModelConfig
from shardline.models.weights import WeightReader
from shardline.parallel.sharding import HeadSplit, TensorParallel, vocab_range


class AttentionContext(Protocol):
    def attend(self, layer_index: int, q: Any, k: Any, v: Any, positions: Any, cos_sin: Any | None) -> Any: ...

    def paged_cache(self, layer_index: int) -> tuple[Any, Any, Any] | None:
        """(k_cache, v_cache, slot_mapping) where the projection may write k and v itself
        (then attend_rotated), else None."""

    def attend_rotated(self, layer_index: int, q: Any) -> Any:
        """Attention of the rotated q over the cache paged_cache named, k and v already in it."""


class Norm:
    """RMSNorm or LayerNorm (replicated on every rank), with the fused residual add.

    fold (RMSNorm): the projection after the norm takes the norm's weight into its columns
    (take_column_scale, then WeightReader.concat), the norm's own weight is all ones, and the ops
    may run the norm inside the op after that GEMM (`folded`: rms_norm_linear, rms_norm_qkv_rope
    then ignore the unit weight), its 1 / rms scaling the GEMM's rows, so the norm needs no
    kernel of its own there."""

    def __init__(self, backend: Backend, config: ModelConfig, w: WeightReader, prefix: str, fold: bool = False):
        h = config.hidden_size
        self.ops, self.eps, self.kind = backend.ops, config.norm_eps, config.norm
        self.folded = fold and config.norm == "rms"
        self._column_scale = w.host(f"{prefix}.weight", (h,)) if self.folded else None
        self.weight = backend.asarray(np.ones(h, np.float32)) if self.folded else w.get(f"{prefix}.weight", (h,))
        self.bias = w.get(f"{prefix}.bias", (h,)) if config.norm == "layer" else None

    def take_column_scale(self):
        """The folded norm's weight (host float32) for the projection after it, once (None unfolded)."""
        scale, self._column_scale = self._column_scale, None
        return scale

    def __call__(self, x, residual=None):
        if self.kind == "rms":
            return self.ops.rms_norm(x, self.weight, self.eps, residual)
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps, residual)

    def with_residual(self, x, residual):
        """(norm(x (+ residual)), the new residual stream: x itself without one)."""
        return self(x, residual) if residual is not None else (self(x), x)

    def into_linear(self, x, residual, weight, bias=None, gated: bool = False):
        """(linear(norm(x (+ residual))), the new residual: x itself without one); gated:
        gated_linear. An RMSNorm may run fused into the GEMM (ops.rms_norm_linear)."""
        if self.kind == "rms":
            return self.ops.rms_norm_linear(x, self.weight, self.eps, residual, weight, bias, gated,
                                            folded=self.folded)
        normed, residual = self.with_residual(x, residual)
        return (self.ops.gated_linear if gated else self.ops.linear)(normed, weight, bias), residual

    def into_qkv_rope(self, x, residual, attn: "Attention", positions, cache):
        """(q rotated, the new residual): attn's QKV projection of the RMSNorm of x (+ residual),
        RoPE, and k and v into cache (k_cache, v_cache, slot_mapping); one kernel where the
        backend fuses them (ops.rms_norm_qkv_rope)."""
        return self.ops.rms_norm_qkv_rope(x, self.weight, self.eps, residual, attn.qkv_weight, attn.qkv_bias,
                                          positions, attn.cos_sin, attn.num_heads, *cache, folded=self.folded)


def rotary_table(backend: Backend, config: ModelConfig) -> Any:
    """The model's cos/sin table on the device, [max_positions, head_dim], shared by its layers."""
    table = rope_cos_sin(config.head_dim, config.max_position_embeddings, config.rope_theta,
                         config.rope_scaling, config.max_position_embeddings)
    dtype = np.float64 if backend.dtype == "float64" else np.float32
    return backend.xp.asarray(table.astype(dtype))


class RowParallelLinear:
    """y = x @ W^T (+ b) where x and W's input columns are split over the tp
    group: each rank's partial product is summed with one all-reduce."""

    def __init__(self, backend: Backend, tp: TensorParallel, weight, bias=None):
        self.ops, self.tp = backend.ops, tp
        self.weight, self.bias = weight, bias  # [out, in / tp], [out]

    def __call__(self, x):
        if self.tp.size == 1:
            return self.ops.linear(x, self.weight, self.bias)
        y = self.tp.comm.all_reduce(self.ops.linear(x, self.weight))
        return y if self.bias is None else self.ops.add(y, self.bias)

    def add_to(self, x, residual):
        """(y, residual) for the norm after, y = self(x); or, on a single rank without a bias
        where the ops say it pays (ops.sums_into_residual), (residual + y summed by the GEMM
        into residual's memory, None): that norm then reads one array instead of two and
        writes one fewer (ops.linear_add)."""
        if residual is None or self.tp.size > 1 or self.bias is not None \
                or not self.ops.sums_into_residual(x, self.weight):
            return self(x), residual
        return self.ops.linear_add(x, self.weight, residual), None


class Attention:
    """This rank's heads: the fused QKV weight (the block projects with it, together with
    the norm before: Norm.into_linear), attention through the context, the row-parallel
    output projection."""

    def __init__(self, backend: Backend, config: ModelConfig, heads: HeadSplit, qkv_weight, qkv_bias,
                 out: RowParallelLinear, cos_sin: Any | None):
        self.ops = backend.ops
        self.head_dim = config.head_dim
        self.num_heads, self.num_kv_heads = heads.num_q_heads, heads.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_weight, self.qkv_bias = qkv_weight, qkv_bias  # [q + 2 kv (this rank), hidden]
        self.out = out
        self.cos_sin = cos_sin  # [max_positions, head_dim] or None

    def from_rotated(self, q, residual, ctx: AttentionContext, layer_index: int):
        """Attention and the output projection, with the residual stream
        (RowParallelLinear.add_to), from the rotated q [T, heads, head_dim], its k and v
        already in the paged cache (Norm.into_qkv_rope)."""
        out = ctx.attend_rotated(layer_index, q)
        return self.out.add_to(out.reshape(q.shape[0], self.q_size), residual)

    def from_qkv(self, qkv, residual, positions, ctx: AttentionContext, layer_index: int):
        """Attention and the output projection, with the residual stream, from the QKV
        projection qkv [T, q + 2 kv] (made with the norm before it: Norm.into_linear)."""
        num_tokens, qs, kvs = qkv.shape[0], self.q_size, self.kv_size
        # Views of the projection's columns: the ops copy what they need contiguous
        # (CUDA's rope_write_kv reads them where they are).
        q = qkv[:, :qs].reshape(num_tokens, self.num_heads, self.head_dim)
        k = qkv[:, qs:qs + kvs].reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = qkv[:, qs + kvs:].reshape(num_tokens, self.num_kv_heads, self.head_dim)
        out = ctx.attend(layer_index, q, k, v, positions, self.cos_sin)  # [T, heads, head_dim]
        return self.out.add_to(out.reshape(num_tokens, qs), residual)


class GatedMLP:
    """SiLU-gated MLP, gate and up fused: down(silu(gate(x)) * up(x)).
    gate/up hold this rank's rows of the intermediate dimension; `down` is
    row-parallel (pass a single-rank one to defer the reduction, as MoE does)."""

    def __init__(self, backend: Backend, gate_up_weight, down: RowParallelLinear, gate_up_bias=None):
        self.ops = backend.ops
        self.gate_up_weight, self.gate_up_bias = gate_up_weight, gate_up_bias  # [2 * inter / tp, hidden]
        self.down = down

    def __call__(self, x):
        return self.down(self.ops.gated_linear(x, self.gate_up_weight, self.gate_up_bias))


class GeluMLP:
    def __init__(self, backend: Backend, fc_weight, fc_bias, proj: RowParallelLinear, approximate: str):
        self.ops, self.approximate = backend.ops, approximate
        self.fc_weight, self.fc_bias = fc_weight, fc_bias  # [inter / tp, hidden]
        self.proj = proj

    def __call__(self, x):
        return self.proj(self.ops.gelu(self.ops.linear(x, self.fc_weight, self.fc_bias), self.approximate))


class VocabParallel:
    """Embedding table and LM head split by vocabulary rows over the tp group
    (ceil(vocab / tp) rows each, the last rank zero-padded)."""

    def __init__(self, backend: Backend, tp: TensorParallel, w: WeightReader, name: str, vocab: int, hidden: int):
        self.ops, self.xp, self.tp, self.vocab = backend.ops, backend.xp, tp, vocab
        start, stop, per_rank = vocab_range(vocab, tp.size, tp.rank)
        rows = w.host(name, (vocab, hidden), 0, (start, stop) if tp.size > 1 else None)
        self.start = start
        self.weight = backend.asarray(np.pad(rows, ((0, per_rank - rows.shape[0]), (0, 0))))

    def embed(self, ids):
        if self.tp.size == 1:
            return self.ops.embedding(self.weight, ids)
        return self.tp.comm.all_reduce(self.ops.vocab_embedding(self.weight, ids, self.start))

    def logits(self, hidden):
        # hidden [n, hidden] -> [n, vocab]
        local = self.ops.linear(hidden, self.weight)  # [n, vocab / tp (padded)]
        if self.tp.size == 1:
            return local
        return self.xp.ascontiguousarray(self.tp.comm.all_gather(local, axis=-1)[:, :self.vocab])


class PreNormBlock:
    """norm -> attention -> residual add + norm -> MLP. A block takes and returns (x, residual):
    the stream is x + residual, or x alone where residual is None. Each residual add is fused
    into the norm after it, or on a single rank into the projection before it (its GEMM sums
    into the residual: RowParallelLinear.add_to). Subclasses build the five parts."""

    index: int
    input_norm: Norm
    attn: Attention
    post_norm: Norm
    mlp: Any

    def __call__(self, x, residual, positions, ctx: AttentionContext):
        # Each norm goes with the projection after it (one kernel where the backend fuses them),
        # over a paged cache with RoPE and the KV write too.
        cache = ctx.paged_cache(self.index) if self.attn.cos_sin is not None and self.input_norm.kind == "rms" else None
        if cache is not None:
            q, residual = self.input_norm.into_qkv_rope(x, residual, self.attn, positions, cache)
            x, residual = self.attn.from_rotated(q, residual, ctx, self.index)
        else:
            qkv, residual = self.input_norm.into_linear(x, residual, self.attn.qkv_weight, self.attn.qkv_bias)
            x, residual = self.attn.from_qkv(qkv, residual, positions, ctx, self.index)
        if isinstance(self.mlp, GatedMLP):
            h, residual = self.post_norm.into_linear(x, residual, self.mlp.gate_up_weight, self.mlp.gate_up_bias,
                                                     gated=True)
            return self.mlp.down.add_to(h, residual)
        x, residual = self.post_norm.with_residual(x, residual)
        return self.mlp(x), residual
