"""Building blocks shared by the model files: norms, attention, MLPs, MoE.

Layers hold backend arrays and call `backend.ops`; they never branch on the
backend and never keep per-step state. Per-step metadata arrives as an
argument: `positions` and an attention context with one method,

    attend(layer_index, q, k, v, positions, cos_sin) -> out
        q [num_tokens, num_heads, head_dim], k/v [num_tokens, num_kv_heads,
        head_dim] for this step's tokens, before RoPE; cos_sin is the
        model's rotary table (None for models without RoPE). The context
        applies RoPE, stores k/v in its KV cache (one fused kernel where the
        backend has it) and returns attention over each whole sequence,
        [num_tokens, num_heads, head_dim].
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from shardline.kernels.backend import Backend
from shardline.kernels.rope import rope_cos_sin
from shardline.models.config import ModelConfig
from shardline.models.weights import WeightReader


class AttentionContext(Protocol):
    def attend(self, layer_index: int, q: Any, k: Any, v: Any, positions: Any, cos_sin: Any | None) -> Any: ...


class Norm:
    """RMSNorm or LayerNorm, with the fused residual add."""

    def __init__(self, backend: Backend, config: ModelConfig, w: WeightReader, prefix: str):
        h = config.hidden_size
        self.ops, self.eps, self.kind = backend.ops, config.norm_eps, config.norm
        self.weight = w.get(f"{prefix}.weight", (h,))
        self.bias = w.get(f"{prefix}.bias", (h,)) if config.norm == "layer" else None

    def __call__(self, x, residual=None):
        if self.kind == "rms":
            return self.ops.rms_norm(x, self.weight, self.eps, residual)
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps, residual)


def rotary_table(backend: Backend, config: ModelConfig) -> Any:
    """The model's cos/sin table on the device, [max_positions, head_dim], shared by its layers."""
    table = rope_cos_sin(config.head_dim, config.max_position_embeddings, config.rope_theta,
                         config.rope_scaling, config.max_position_embeddings)
    dtype = np.float64 if backend.dtype == "float64" else np.float32
    return backend.xp.asarray(table.astype(dtype))


class Attention:
    """Fused QKV projection, attention (with RoPE when cos_sin is given) through
    the context, output projection."""

    def __init__(self, backend: Backend, config: ModelConfig, qkv_weight, qkv_bias, o_weight,
                 o_bias, cos_sin: Any | None):
        self.ops, self.xp, self.c = backend.ops, backend.xp, config
        self.qkv_weight, self.qkv_bias = qkv_weight, qkv_bias  # [q + 2 kv, hidden]
        self.o_weight, self.o_bias = o_weight, o_bias          # [hidden, q]
        self.cos_sin = cos_sin  # [max_positions, head_dim] or None

    def __call__(self, x, positions, ctx: AttentionContext, layer_index: int):
        c, num_tokens = self.c, x.shape[0]
        qkv = self.ops.linear(x, self.qkv_weight, self.qkv_bias)  # [T, q + 2 kv]
        q = self.xp.ascontiguousarray(qkv[:, :c.q_size]).reshape(num_tokens, c.num_heads, c.head_dim)
        k = self.xp.ascontiguousarray(qkv[:, c.q_size:c.q_size + c.kv_size])
        v = self.xp.ascontiguousarray(qkv[:, c.q_size + c.kv_size:])
        k = k.reshape(num_tokens, c.num_kv_heads, c.head_dim)
        v = v.reshape(num_tokens, c.num_kv_heads, c.head_dim)
        out = ctx.attend(layer_index, q, k, v, positions, self.cos_sin)  # [T, heads, head_dim]
        return self.ops.linear(out.reshape(num_tokens, c.q_size), self.o_weight, self.o_bias)


class GatedMLP:
    """SiLU-gated MLP with gate and up fused: down(silu(gate(x)) * up(x))."""

    def __init__(self, backend: Backend, gate_up_weight, down_weight, gate_up_bias=None, down_bias=None):
        self.ops = backend.ops
        self.gate_up_weight, self.gate_up_bias = gate_up_weight, gate_up_bias  # [2 * inter, hidden]
        self.down_weight, self.down_bias = down_weight, down_bias              # [hidden, inter]

    def __call__(self, x):
        h = self.ops.silu_and_mul(self.ops.linear(x, self.gate_up_weight, self.gate_up_bias))
        return self.ops.linear(h, self.down_weight, self.down_bias)


class GeluMLP:
    def __init__(self, backend: Backend, fc_weight, fc_bias, proj_weight, proj_bias, approximate: str):
        self.ops, self.approximate = backend.ops, approximate
        self.fc_weight, self.fc_bias = fc_weight, fc_bias
        self.proj_weight, self.proj_bias = proj_weight, proj_bias

    def __call__(self, x):
        h = self.ops.gelu(self.ops.linear(x, self.fc_weight, self.fc_bias), self.approximate)
        return self.ops.linear(h, self.proj_weight, self.proj_bias)


class SparseMoE:
    """Top-k softmax routing over experts (renormalised, as Mixtral does).

    Single rank: tokens are grouped by expert on the host and each expert
    runs on its rows; expert parallelism replaces this dispatch later.
    """

    def __init__(self, backend: Backend, router_weight, experts: list[GatedMLP], top_k: int):
        self.backend, self.ops = backend, backend.ops
        self.router_weight = router_weight  # [num_experts, hidden]
        self.experts, self.top_k = experts, top_k

    def __call__(self, x):
        ops, xp = self.ops, self.backend.xp
        logits = ops.linear(x, self.router_weight)  # [T, experts]
        weights, ids = ops.topk_softmax(logits, self.top_k, True)  # [T, k] each
        host_ids = self.backend.to_numpy(ids)
        out = xp.zeros_like(x)
        for expert_index, expert in enumerate(self.experts):
            tokens, slots = np.nonzero(host_ids == expert_index)
            if tokens.size == 0:
                continue
            rows = xp.asarray(tokens.astype(np.int32))
            scale = weights[rows, xp.asarray(slots.astype(np.int32))]  # [n] float32
            ops.scatter_add_rows(out, rows, expert(ops.index_rows(x, rows)), scale)
        return out


class PreNormBlock:
    """norm -> attention -> residual add + norm -> MLP, with the residual add
    fused into the norms. Subclasses build the five parts."""

    index: int
    input_norm: Norm
    attn: Attention
    post_norm: Norm
    mlp: Any

    def __call__(self, x, residual, positions, ctx: AttentionContext):
        if residual is None:
            x, residual = self.input_norm(x), x
        else:
            x, residual = self.input_norm(x, residual)
        x = self.attn(x, positions, ctx, self.index)
        x, residual = self.post_norm(x, residual)
        return self.mlp(x), residual

