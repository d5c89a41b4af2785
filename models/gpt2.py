"""GPT-2: learned positions, LayerNorm, GELU MLP, biases everywhere.

HF stores GPT-2's projections as Conv1D, weight [in, out]; they are
transposed once at load into the [out, in] layout `linear` takes, then
sliced for this rank under tensor parallelism; a pipeline stage holds only
its layers (embeddings on the first stage, ln_f and the tied head on the
last). Layers only.
"""

from __future__ import annotations

import numpy as np

from shardline.kernels.backend import Backend
from shardline.models.config import ModelConfig
from shardline.models.layers import (Attention, AttentionContext, GeluMLP, Norm, PreNormBlock,
                                     RowParallelLinear, VocabParallel)
from shardline.models.llama import head_rows
from shardline.models.weights import WeightReader
from shardline.parallel.pipeline import PipelineStage
from shardline.parallel.sharding import TensorParallel, even_range, split_heads


def conv1d(w: WeightReader, name: str, fan_in: int, fan_out: int) -> np.ndarray:
    """Conv1D weight [in, out] -> [out, in] on the host."""
    return np.ascontiguousarray(w.host(name, (fan_in, fan_out)).T)


class GPT2Block(PreNormBlock):
    def __init__(self, backend: Backend, c: ModelConfig, w: WeightReader, tp: TensorParallel, i: int,
                 kv_index: int):
        p, h, inter = f"transformer.h.{i}", c.hidden_size, c.intermediate_size
        split = split_heads(c.num_heads, c.num_kv_heads, tp.size, tp.rank)
        (q0, q1), _ = head_rows(split, c.head_dim)
        qkv_rows = np.r_[q0:q1, h + q0:h + q1, 2 * h + q0:2 * h + q1]  # this rank's q, k, v rows
        asarray = backend.asarray
        self.index = kv_index  # this layer's place in its stage's KV cache
        self.input_norm = Norm(backend, c, w, f"{p}.ln_1")
        out = RowParallelLinear(backend, tp, asarray(conv1d(w, f"{p}.attn.c_proj.weight", h, h)[:, q0:q1]),
                                w.get(f"{p}.attn.c_proj.bias", (h,)))
        self.attn = Attention(backend, c, split, asarray(conv1d(w, f"{p}.attn.c_attn.weight", h, 3 * h)[qkv_rows]),
                              asarray(w.host(f"{p}.attn.c_attn.bias", (3 * h,))[qkv_rows]), out, cos_sin=None)
        self.post_norm = Norm(backend, c, w, f"{p}.ln_2")
        f0, f1 = even_range(inter, tp.size, tp.rank, "n_inner")
        proj = RowParallelLinear(backend, tp, asarray(conv1d(w, f"{p}.mlp.c_proj.weight", inter, h)[:, f0:f1]),
                                 w.get(f"{p}.mlp.c_proj.bias", (h,)))
        self.mlp = GeluMLP(backend, asarray(conv1d(w, f"{p}.mlp.c_fc.weight", h, inter)[f0:f1]),
                           asarray(w.host(f"{p}.mlp.c_fc.bias", (inter,))[f0:f1]), proj,
                           "none" if c.activation == "gelu" else "tanh")


class GPT2LMHeadModel:
    def __init__(self, backend: Backend, config: ModelConfig, w: WeightReader, tp: TensorParallel = TensorParallel(),
                 stage: PipelineStage = PipelineStage()):
        c = config
        self.backend, self.config, self.ops, self.tp, self.stage = backend, c, backend.ops, tp, stage
        # HF checkpoints come with and without the "transformer." prefix.
        w = _PrefixedReader(w) if not w.has("transformer.wte.weight") else w
        # The head is tied to wte: the last stage loads its own copy when it is not the first.
        needs_wte = stage.is_first or stage.is_last
        self.wte = VocabParallel(backend, tp, w, "transformer.wte.weight", c.vocab_size,
                                 c.hidden_size) if needs_wte else None
        self.wpe = w.get("transformer.wpe.weight", (c.max_position_embeddings, c.hidden_size)) \
            if stage.is_first else None
        layers = stage.layer_range(c.num_layers)
        self.layers = [GPT2Block(backend, c, w, tp, i, i - layers.start) for i in layers]
        self.ln_f = Norm(backend, c, w, "transformer.ln_f") if stage.is_last else None
        self.num_kv_heads_per_rank = split_heads(c.num_heads, c.num_kv_heads, tp.size, tp.rank).num_kv_heads

    def embed_tokens(self, ids, positions):
        return self.ops.add(self.wte.embed(ids), self.ops.embedding(self.wpe, positions))

    def run_layers(self, x, residual, positions, ctx: AttentionContext):
        for layer in self.layers:
            x, residual = layer(x, residual, positions, ctx)
        return x, residual

    def final_norm(self, x, residual):
        return self.ln_f.with_residual(x, residual)[0]

    def forward(self, ids, positions, ctx: AttentionContext):
        x, residual = self.run_layers(self.embed_tokens(ids, positions), None, positions, ctx)
        return self.final_norm(x, residual)

    def compute_logits(self, hidden):
        return self.wte.logits(hidden)


class _PrefixedReader:
    """Reads `transformer.X` as `X` for checkpoints saved without the prefix."""

    def __init__(self, inner: WeightReader):
        self.inner, self.backend = inner, inner.backend

    def _strip(self, name: str) -> str:
        return name.removeprefix("transformer.")

    def has(self, name):
        return self.inner.has(self._strip(name))

    def host(self, name, shape, axis=0, part=None):
        return self.inner.host(self._strip(name), shape, axis, part)

    def get(self, name, shape, axis=0, part=None):
        return self.inner.get(self._strip(name), shape, axis, part)
