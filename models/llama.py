"""Llama-family decoder: Llama 2/3, Mistral, SmolLM2, Qwen2 (QKV bias).

Pre-norm blocks: RMSNorm -> attention with RoPE and grouped KV heads ->
RMSNorm -> SiLU-gated MLP, with the residual add fused into each norm.
Layers only: caches and step metadata come in through `forward`'s
arguments. Mixtral (mixtral.py) reuses this with a sparse MoE MLP.
"""

from __future__ import annotations

from shardline.kernels.backend import Backend
from shardline.models.config import ModelConfig
from shardline.models.layers import Attention, AttentionContext, GatedMLP, Norm, PreNormBlock, rotary_table
from shardline.models.weights import WeightReader


class LlamaBlock(PreNormBlock):
    def __init__(self, backend: Backend, c: ModelConfig, w: WeightReader, i: int, cos_sin, mlp):
        p = f"model.layers.{i}"
        h, names = c.hidden_size, ("q", "k", "v")
        shapes = [(c.q_size, h), (c.kv_size, h), (c.kv_size, h)]
        qkv_w = w.concat([f"{p}.self_attn.{n}_proj.weight" for n in names], shapes)
        qkv_b = w.concat([f"{p}.self_attn.{n}_proj.bias" for n in names],
                         [s[:1] for s in shapes]) if c.qkv_bias else None
        o_w = w.get(f"{p}.self_attn.o_proj.weight", (h, c.q_size))
        o_b = w.get(f"{p}.self_attn.o_proj.bias", (h,)) if c.o_bias else None
        self.index = i
        self.input_norm = Norm(backend, c, w, f"{p}.input_layernorm")
        self.attn = Attention(backend, c, qkv_w, qkv_b, o_w, o_b, cos_sin)
        self.post_norm = Norm(backend, c, w, f"{p}.post_attention_layernorm")
        self.mlp = mlp


def gated_mlp(backend: Backend, c: ModelConfig, w: WeightReader, prefix: str, inter: int) -> GatedMLP:
    h = c.hidden_size
    gate_up = w.concat([f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight"], [(inter, h)] * 2)
    down = w.get(f"{prefix}.down_proj.weight", (h, inter))
    if not c.mlp_bias:
        return GatedMLP(backend, gate_up, down)
    gate_up_b = w.concat([f"{prefix}.gate_proj.bias", f"{prefix}.up_proj.bias"], [(inter,)] * 2)
    return GatedMLP(backend, gate_up, down, gate_up_b, w.get(f"{prefix}.down_proj.bias", (h,)))


class LlamaForCausalLM:
    def __init__(self, backend: Backend, config: ModelConfig, w: WeightReader):
        c = config
        self.backend, self.config, self.ops = backend, c, backend.ops
        self.embed = w.get("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))
        cos_sin = rotary_table(backend, c)
        self.layers = [LlamaBlock(backend, c, w, i, cos_sin, self.build_mlp(backend, c, w, i))
                       for i in range(c.num_layers)]
        self.norm = Norm(backend, c, w, "model.norm")
        tied = c.tie_word_embeddings or not w.has("lm_head.weight")
        self.lm_head = self.embed if tied else w.get("lm_head.weight", (c.vocab_size, c.hidden_size))

    def build_mlp(self, backend: Backend, c: ModelConfig, w: WeightReader, i: int):
        return gated_mlp(backend, c, w, f"model.layers.{i}.mlp", c.intermediate_size)

    def forward(self, ids, positions, ctx: AttentionContext):
        """ids, positions [num_tokens] -> final hidden states [num_tokens, hidden]."""
        x, residual = self.ops.embedding(self.embed, ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, ctx)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden):
        # hidden [n, hidden] -> [n, vocab]
        return self.ops.linear(hidden, self.lm_head)
