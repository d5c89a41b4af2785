"""Mixtral: the Llama block with a sparse mixture-of-experts MLP (top-2
softmax gating, renormalised). Layers only."""

from __future__ import annotations

from shardline.kernels.backend import Backend
from shardline.models.config import ModelConfig
from shardline.models.layers import GatedMLP, SparseMoE
from shardline.models.llama import LlamaForCausalLM
from shardline.models.weights import WeightReader


class MixtralForCausalLM(LlamaForCausalLM):
    def build_mlp(self, backend: Backend, c: ModelConfig, w: WeightReader, i: int):
        p, h, inter = f"model.layers.{i}.block_sparse_moe", c.hidden_size, c.intermediate_size
        experts = []
        for e in range(c.num_experts):
            # HF's Mixtral names: w1 = gate, w3 = up, w2 = down.
            gate_up = w.concat([f"{p}.experts.{e}.w1.weight", f"{p}.experts.{e}.w3.weight"],
                               [(inter, h)] * 2)
            experts.append(GatedMLP(backend, gate_up, w.get(f"{p}.experts.{e}.w2.weight", (h, inter))))
        router = w.get(f"{p}.gate.weight", (c.num_experts, h))
        return SparseMoE(backend, router, experts, c.num_experts_per_token)
