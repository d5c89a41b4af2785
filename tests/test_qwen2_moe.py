"""Qwen2-MoE on the NumPy backend against HF transformers' Qwen2MoeForCausalLM
(torch, float32), single rank: prefill logits at every position and
incremental decode, max|diff| / max|ref| <= 1e-4, on tiny random configs
with and without top-k renormalisation, dense layers mixed in
(decoder_sparse_step, mlp_only_layers), a shared expert with its sigmoid
gate; and the expert-load metric against HF's router logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shardline.kernels.backend import create_backend
from shardline.models.loader import load_model
from shardline.models.moe import SparseMoE
from shardline.worker.generate import prompt_logits
# The same prefill and incremental-decode checks as for the dense families,
# run here against this module's `tiny` fixture (Qwen2-MoE checkpoints).
from test_models_hf import test_incremental_decode_matches_hf, test_prefill_logits_match_hf  # noqa: F401

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=503, hidden_size=80, intermediate_size=96, moe_intermediate_size=40,
             shared_expert_intermediate_size=56, num_attention_heads=5, num_key_value_heads=1,
             max_position_embeddings=256, num_experts=8, num_experts_per_tok=2)
CONFIGS = {
    "all_sparse": dict(num_hidden_layers=3, norm_topk_prob=False),
    "renormalised_with_dense": dict(num_hidden_layers=4, norm_topk_prob=True, decoder_sparse_step=2,
                                    mlp_only_layers=[3]),
}


def save_qwen2_moe(name: str, folder: Path, seed: int):
    config = transformers.Qwen2MoeConfig(**SHAPE, **CONFIGS[name])
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Qwen2MoeForCausalLM(config).float().eval()
    with torch.no_grad():  # larger than the 0.02 init so that every layer matters
        for param in model.parameters():
            param.normal_(0.0, 0.15) if param.dim() >= 2 else param.copy_(1.0 + 0.2 * torch.randn_like(param))
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


@pytest.fixture(params=sorted(CONFIGS))
def tiny(request, tmp_path):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    folder, hf_model = save_qwen2_moe(request.param, tmp_path / request.param, seed)
    ours = load_model(folder, create_backend("numpy"), show_progress=False).model
    return ours, hf_model, np.random.default_rng(seed), seed


def test_dense_and_sparse_layers_follow_the_config(tiny):
    ours, hf_model, _, _ = tiny
    ours_sparse = [isinstance(layer.mlp, SparseMoE) for layer in ours.layers]
    hf_sparse = [type(layer.mlp).__name__ == "Qwen2MoeSparseMoeBlock" for layer in hf_model.model.layers]
    assert ours_sparse == hf_sparse


def test_expert_load_matches_hf_routing(tiny):
    ours, hf_model, rng, seed = tiny
    ids = rng.integers(0, ours.config.vocab_size, 23).tolist()
    prompt_logits(ours, ids)
    with torch.no_grad():
        router_logits = hf_model(torch.tensor([ids]), output_router_logits=True).router_logits
    top_k, num_experts = ours.config.num_experts_per_token, ours.config.num_experts
    num_moe_layers = sum(map(ours.config.is_moe_layer, range(ours.config.num_layers)))
    assert len(ours.expert_loads()) == len(router_logits) == num_moe_layers
    for load, logits in zip(ours.expert_loads(), router_logits):
        chosen = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1).indices
        expected = np.bincount(chosen.reshape(-1).numpy(), minlength=num_experts)
        assert load.tokens_per_expert.tolist() == expected.tolist(), f"seed {seed}"
        assert load.imbalance_ratio == pytest.approx(expected.max() / expected.mean())


def test_mlp_width_counts_experts_and_the_shared_expert(tiny):
    ours, hf_model, _, _ = tiny
    for i, layer in enumerate(hf_model.model.layers):
        params = sum(p.numel() for name, p in layer.mlp.named_parameters()
                     if not name.startswith(("gate.", "shared_expert_gate.")))
        assert params == 3 * ours.config.hidden_size * ours.config.mlp_width(i)


def test_dense_experts_match_the_sorted_experts(tiny, monkeypatch):
    """Up to dense_max_tokens tokens every expert runs on every token (no host sync: CUDA
    graphs); above, the tokens are sorted by expert. Both give the same logits and loads."""
    ours, _, rng, seed = tiny
    ids = rng.integers(0, ours.config.vocab_size, 19).tolist()
    dense_logits = prompt_logits(ours, ids)
    dense_loads = [load.tokens_per_expert.tolist() for load in ours.expert_loads()]
    assert all(layer.mlp._device_ids is not None for layer in ours.layers if isinstance(layer.mlp, SparseMoE))
    monkeypatch.setattr(SparseMoE, "dense_max_tokens", 0)
    sorted_logits = prompt_logits(ours, ids)
    assert all(layer.mlp._device_ids is None for layer in ours.layers if isinstance(layer.mlp, SparseMoE))
    err = np.max(np.abs(dense_logits - sorted_logits)) / np.max(np.abs(sorted_logits))
    assert err <= 1e-6, f"seed {seed}: rel err {err:.2e}"
    assert [load.tokens_per_expert.tolist() for load in ours.expert_loads()] == dense_loads
    assert sum(dense_loads[0]) == len(ids) * ours.config.num_experts_per_token


@pytest.mark.parametrize("rows", [1, 2])
def test_selected_dense_and_sorted_experts_agree(tiny, monkeypatch, rows):
    """Fewer (token, slot) pairs than experts: each pair's expert alone (ops.expert_linear);
    the dense and sorted paths give the same output, and so does the load."""
    ours, _, rng, seed = tiny
    layer = next(layer.mlp for layer in ours.layers if isinstance(layer.mlp, SparseMoE))
    x = rng.standard_normal((rows, ours.config.hidden_size)).astype(layer.router_weight.dtype)
    assert layer._selects(x) and not layer._selects(np.concatenate([x] * 4))
    outputs, loads = [], []
    for setting, value in [(None, None), ("select_experts", False), ("dense_max_tokens", 0)]:
        if setting:
            monkeypatch.setattr(SparseMoE, setting, value)
        outputs.append(layer(x))
        loads.append(layer.last_expert_load.tokens_per_expert.tolist())
    for other in outputs[1:]:
        err = np.max(np.abs(outputs[0] - other)) / np.max(np.abs(other))
        assert err <= 1e-6, f"seed {seed}: rel err {err:.2e}"
    assert loads[0] == loads[1] == loads[2] and sum(loads[0]) == rows * layer.top_k
