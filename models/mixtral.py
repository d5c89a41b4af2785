"""Mixtral: the Llama block with a sparse mixture-of-experts MLP (top-2
softmax gating, renormalised). With ep = 1 every expert is split over tp
like a dense MLP and the MoE output is reduced once; with ep > 1 each rank
holds whole experts and tokens move by all-to-all (models/moe.py).
Layers only."""

from __future__ import annotations

from shardline.kernels.backend import Backend
from shardline.models.config import ModelConfig
from shardline.models.moe import MoEForCausalLM, SparseMoE, load_experts
from shardline.models.weights import WeightReader
from shardline.parallel.sharding import TensorParallel

# HF's Mixtral names the expert projections w1 (gate), w3 (up), w2 (down).
_EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


class _ExpertNames:
    """Reads `...experts.E.gate_proj` as HF's `...experts.E.w1` (and so on),
    so experts load through the dense MLP's code."""

    def __init__(self, inner: WeightReader):
        self.inner = inner

    def _name(self, name: str) -> str:
        for ours, theirs in _EXPERT_NAMES.items():
            name = name.replace(f".{ours}.", f".{theirs}.")
        return name

    def concat(self, names, shapes, parts=None, column_scale=None):
        return self.inner.concat([self._name(n) for n in names], shapes, parts, column_scale)

    def get(self, name, shape, axis=0, part=None):
        return self.inner.get(self._name(name), shape, axis, part)


class MixtralForCausalLM(MoEForCausalLM):
    def build_mlp(self, backend: Backend, c: ModelConfig, w: WeightReader, tp: TensorParallel, i: int):
        p = f"model.layers.{i}.block_sparse_moe"
        experts = load_experts(backend, c, _ExpertNames(w), tp, self.ep, f"{p}.experts", c.intermediate_size)
        router = w.get(f"{p}.gate.weight", (c.num_experts, c.hidden_size))
        return SparseMoE(backend, tp, self.ep, router, experts, c.num_experts_per_token, renormalize=True)
