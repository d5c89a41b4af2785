"""GPT-2: learned positions, LayerNorm, GELU MLP, biases everywhere.

HF stores GPT-2's projections as Conv1D, weight [in, out]; they are
transposed once at load into the [out, in] layout `linear` takes. Layers only.
"""

from __future__ import annotations

from shardline.kernels.backend import Backend
from shardline.models.config import ModelConfig
from shardline.models.layers import Attention, AttentionContext, GeluMLP, Norm, PreNormBlock
from shardline.models.weights import WeightReader


def conv1d(backend: Backend, w: WeightReader, name: str, fan_in: int, fan_out: int):
    return backend.asarray(w.host(name, (fan_in, fan_out)).T.copy())


class GPT2Block(PreNormBlock):
    def __init__(self, backend: Backend, c: ModelConfig, w: WeightReader, i: int):
        p, h, inter = f"transformer.h.{i}", c.hidden_size, c.intermediate_size
        self.index = i
        self.input_norm = Norm(backend, c, w, f"{p}.ln_1")
        self.attn = Attention(backend, c, conv1d(backend, w, f"{p}.attn.c_attn.weight", h, 3 * h),
                              w.get(f"{p}.attn.c_attn.bias", (3 * h,)),
                              conv1d(backend, w, f"{p}.attn.c_proj.weight", h, h),
                              w.get(f"{p}.attn.c_proj.bias", (h,)), cos_sin=None)
        self.post_norm = Norm(backend, c, w, f"{p}.ln_2")
        approximate = "none" if c.activation == "gelu" else "tanh"
        self.mlp = GeluMLP(backend, conv1d(backend, w, f"{p}.mlp.c_fc.weight", h, inter),
                           w.get(f"{p}.mlp.c_fc.bias", (inter,)),
                           conv1d(backend, w, f"{p}.mlp.c_proj.weight", inter, h),
                           w.get(f"{p}.mlp.c_proj.bias", (h,)), approximate)


class GPT2LMHeadModel:
    def __init__(self, backend: Backend, config: ModelConfig, w: WeightReader):
        c = config
        self.backend, self.config, self.ops = backend, c, backend.ops
        # HF checkpoints come with and without the "transformer." prefix.
        w = _PrefixedReader(w) if not w.has("transformer.wte.weight") else w
        self.wte = w.get("transformer.wte.weight", (c.vocab_size, c.hidden_size))
        self.wpe = w.get("transformer.wpe.weight", (c.max_position_embeddings, c.hidden_size))
        self.layers = [GPT2Block(backend, c, w, i) for i in range(c.num_layers)]
        self.ln_f = Norm(backend, c, w, "transformer.ln_f")
        self.lm_head = self.wte

    def forward(self, ids, positions, ctx: AttentionContext):
        ops = self.ops
        x = ops.add(ops.embedding(self.wte, ids), ops.embedding(self.wpe, positions))
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, ctx)
        x, _ = self.ln_f(x, residual)
        return x

    def compute_logits(self, hidden):
        return self.ops.linear(hidden, self.lm_head)


class _PrefixedReader:
    """Reads `transformer.X` as `X` for checkpoints saved without the prefix."""

    def __init__(self, inner: WeightReader):
        self.inner, self.backend = inner, inner.backend

    def _strip(self, name: str) -> str:
        return name.removeprefix("transformer.")

    def has(self, name):
        return self.inner.has(self._strip(name))

    def host(self, name, shape):
        return self.inner.host(self._strip(name), shape)

    def get(self, name, shape):
        return self.inner.get(self._strip(name), shape)
