"""Llama-family decoder: Llama 2/3, Mistral, SmolLM2, Qwen2 (QKV bias).

Pre-norm blocks: RMSNorm -> attention with RoPE and grouped KV heads ->
RMSNorm -> SiLU-gated MLP, with each residual add fused into the norm after
it or into the projection before it (PreNormBlock).
Under tensor parallelism each rank reads only its heads' rows of Q/K/V,
its columns of o_proj, and its slice of the MLP. Layers only: caches and
step metadata come in through `forward`'s arguments. Mixtral (mixtral.py)
reuses this with a sparse MoE MLP. Under pipeline parallelism a stage holds
only its layers (`PipelineStage`), the embedding on the first stage and
the final norm and LM head on the last; `embed_tokens`, `run_layers` and
`final_norm` are the three parts a pipeline runs stage by stage.
"""

from __future__ import annotations

import functools

from shardline.kernels.backend import Backend
from shardline.models.config import ModelConfig
from shardline.models.layers import (Attention, AttentionContext, GatedMLP, Norm, PreNormBlock,
                                     RowParallelLinear, VocabParallel, rotary_table)
from shardline.models.weights import WeightReader
from shardline.parallel.pipeline import PipelineStage
from shardline.parallel.sharding import HeadSplit, TensorParallel, even_range, split_heads


def head_rows(split: HeadSplit, head_dim: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Row ranges of this rank's query and KV heads in the q / k,v projections."""
    (q0, q1), (k0, k1) = split.q_heads, split.kv_heads
    return (q0 * head_dim, q1 * head_dim), (k0 * head_dim, k1 * head_dim)


def llama_attention(backend: Backend, c: ModelConfig, w: WeightReader, tp: TensorParallel, p: str,
                    cos_sin, column_scale=None) -> Attention:
    """column_scale: the folded input norm's weight (Norm), into the QKV weight's columns."""
    split = split_heads(c.num_heads, c.num_kv_heads, tp.size, tp.rank)
    q_rows, kv_rows = head_rows(split, c.head_dim)
    h, names = c.hidden_size, [f"{p}.self_attn.{n}_proj" for n in ("q", "k", "v")]
    shapes, parts = [(c.q_size, h), (c.kv_size, h), (c.kv_size, h)], [q_rows, kv_rows, kv_rows]
    qkv_w = w.concat([f"{n}.weight" for n in names], shapes, parts, column_scale)
    qkv_b = w.concat([f"{n}.bias" for n in names], [s[:1] for s in shapes], parts) if c.qkv_bias else None
    o_w = w.get(f"{p}.self_attn.o_proj.weight", (h, c.q_size), 1, q_rows)
    o_b = w.get(f"{p}.self_attn.o_proj.bias", (h,)) if c.o_bias else None
    return Attention(backend, c, split, qkv_w, qkv_b, RowParallelLinear(backend, tp, o_w, o_b), cos_sin)


def gated_mlp(backend: Backend, c: ModelConfig, w: WeightReader, tp: TensorParallel, prefix: str,
              inter: int, reduce_tp: TensorParallel | None = None, column_scale=None) -> GatedMLP:
    """`reduce_tp` is the group that sums the down projection (default `tp`;
    MoE passes a single-rank one and reduces once over all experts); column_scale: the folded
    norm's weight (Norm), into gate/up's columns."""
    h, part = c.hidden_size, even_range(inter, tp.size, tp.rank, "intermediate_size")
    names = [f"{prefix}.gate_proj", f"{prefix}.up_proj"]
    gate_up = w.concat([f"{n}.weight" for n in names], [(inter, h)] * 2, [part] * 2, column_scale)
    gate_up_b = w.concat([f"{n}.bias" for n in names], [(inter,)] * 2, [part] * 2) if c.mlp_bias else None
    down_w = w.get(f"{prefix}.down_proj.weight", (h, inter), 1, part)
    down_b = w.get(f"{prefix}.down_proj.bias", (h,)) if c.mlp_bias else None
    down = RowParallelLinear(backend, reduce_tp or tp, down_w, down_b)
    return GatedMLP(backend, gate_up, down, gate_up_b)


class LlamaBlock(PreNormBlock):
    """build_mlp(column_scale) -> the block's MLP; where `dense_mlp` (a GatedMLP that takes
    column_scale), the post-attention norm is folded into its gate/up weight as the input norm
    always is into QKV (Norm's fold)."""

    def __init__(self, backend: Backend, c: ModelConfig, w: WeightReader, tp: TensorParallel, i: int,
                 cos_sin, build_mlp, kv_index: int, dense_mlp: bool = True):
        p = f"model.layers.{i}"
        self.index = kv_index  # this layer's place in its stage's KV cache (i on a single stage)
        self.input_norm = Norm(backend, c, w, f"{p}.input_layernorm", fold=True)
        self.attn = llama_attention(backend, c, w, tp, p, cos_sin, self.input_norm.take_column_scale())
        self.post_norm = Norm(backend, c, w, f"{p}.post_attention_layernorm", fold=dense_mlp)
        self.mlp = build_mlp(self.post_norm.take_column_scale()) if dense_mlp else build_mlp()
        if self.post_norm.folded and not isinstance(self.mlp, GatedMLP):   # only a GatedMLP takes the fold
            raise TypeError(f"layer {i}: build_mlp gave a {type(self.mlp).__name__} for a folded norm (dense_mlp)")


class LlamaForCausalLM:
    dense_mlp = True   # build_mlp gives a GatedMLP taking the post-attention norm's fold (MoE: False)

    def __init__(self, backend: Backend, config: ModelConfig, w: WeightReader, tp: TensorParallel = TensorParallel(),
                 stage: PipelineStage = PipelineStage()):
        c = config
        self.backend, self.config, self.ops, self.tp, self.stage = backend, c, backend.ops, tp, stage
        self.embed = VocabParallel(backend, tp, w, "model.embed_tokens.weight", c.vocab_size,
                                   c.hidden_size) if stage.is_first else None
        cos_sin = rotary_table(backend, c)
        layers = stage.layer_range(c.num_layers)
        self.layers = [LlamaBlock(backend, c, w, tp, i, cos_sin,
                                  functools.partial(self.build_mlp, backend, c, w, tp, i), i - layers.start,
                                  self.dense_mlp) for i in layers]
        self.norm = Norm(backend, c, w, "model.norm") if stage.is_last else None
        self.lm_head = self._lm_head(backend, c, w, tp) if stage.is_last else None
        self.num_kv_heads_per_rank = split_heads(c.num_heads, c.num_kv_heads, tp.size, tp.rank).num_kv_heads

    def _lm_head(self, backend: Backend, c: ModelConfig, w: WeightReader, tp: TensorParallel):
        tied = c.tie_word_embeddings or not w.has("lm_head.weight")
        if tied and self.embed is not None:
            return self.embed
        # A last stage without the embedding loads the tied matrix as its own head.
        name = "model.embed_tokens.weight" if tied else "lm_head.weight"
        return VocabParallel(backend, tp, w, name, c.vocab_size, c.hidden_size)

    def build_mlp(self, backend: Backend, c: ModelConfig, w: WeightReader, tp: TensorParallel, i: int,
                  column_scale=None):
        return gated_mlp(backend, c, w, tp, f"model.layers.{i}.mlp", c.intermediate_size, column_scale=column_scale)

    def embed_tokens(self, ids, positions):
        """ids [num_tokens] -> hidden [num_tokens, hidden] (first stage only)."""
        return self.embed.embed(ids)

    def run_layers(self, x, residual, positions, ctx: AttentionContext):
        """This stage's layers; residual is None before the model's first layer."""
        for layer in self.layers:
            x, residual = layer(x, residual, positions, ctx)
        return x, residual

    def final_norm(self, x, residual):
        return self.norm.with_residual(x, residual)[0]

    def forward(self, ids, positions, ctx: AttentionContext):
        """ids, positions [num_tokens] -> final hidden states [num_tokens, hidden] (a whole model)."""
        x, residual = self.run_layers(self.embed_tokens(ids, positions), None, positions, ctx)
        return self.final_norm(x, residual)

    def compute_logits(self, hidden):
        # hidden [n, hidden] -> [n, vocab] (gathered over the tp group)
        return self.lm_head.logits(hidden)
