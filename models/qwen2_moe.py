"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention (QKV bias)
with MoE MLPs of many narrow experts (width `moe_intermediate_size`),
softmax top-k gating renormalised only when `norm_topk_prob`, plus a
shared expert scaled by sigmoid(`shared_expert_gate`). Layers listed in
`mlp_only_layers`, or off the `decoder_sparse_step` stride, keep a dense
MLP. Layout under tp / ep as in models/moe.py. Layers only."""

from __future__ import annotations

from shardline.kernels.backend import Backend
from shardline.models.config import ModelConfig
from shardline.models.llama import gated_mlp
from shardline.models.moe import MoEForCausalLM, SharedExpert, SparseMoE, load_experts
from shardline.models.weights import WeightReader
from shardline.parallel.sharding import TensorParallel


class Qwen2MoeForCausalLM(MoEForCausalLM):
    def build_mlp(self, backend: Backend, c: ModelConfig, w: WeightReader, tp: TensorParallel, i: int):
        p = f"model.layers.{i}.mlp"
        if not c.is_moe_layer(i):
            return gated_mlp(backend, c, w, tp, p, c.intermediate_size)
        experts = load_experts(backend, c, w, tp, self.ep, f"{p}.experts", c.moe_intermediate_size)
        router = w.get(f"{p}.gate.weight", (c.num_experts, c.hidden_size))
        return SparseMoE(backend, tp, self.ep, router, experts, c.num_experts_per_token,
                         renormalize=c.norm_topk_prob, shared=self._shared_expert(backend, c, w, tp, p))

    def _shared_expert(self, backend: Backend, c: ModelConfig, w: WeightReader, tp: TensorParallel,
                       p: str) -> SharedExpert | None:
        if not c.shared_expert_intermediate_size:
            return None
        # ep > 1 runs it on each rank's token share, so each rank needs it whole
        split = tp if self.ep.size == 1 else TensorParallel()
        mlp = gated_mlp(backend, c, w, split, f"{p}.shared_expert", c.shared_expert_intermediate_size,
                        reduce_tp=TensorParallel())
        return SharedExpert(backend, mlp, w.host(f"{p}.shared_expert_gate.weight", (1, c.hidden_size)))
