"""Our models on the NumPy backend against HF transformers (torch, float32).

Fresh random weights and prompts each run (the seed is in the test id's
output on failure). Checks prefill logits at every position and logits
from incremental decoding (prefill, then one token per step) against HF's
full forward: max|diff| / max|ref| <= 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest

from hf_models import TINY_CONFIGS, hf_logits, save_tiny
from shardline.kernels.backend import create_backend
from shardline.models.loader import load_model
from shardline.worker.generate import _run, prompt_logits
from shardline.worker.sequence_cache import SequenceKVCache

TOLERANCE = 1e-4


def rel_err(ours, ref) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny(request, tmp_path):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    folder, hf_model = save_tiny(request.param, tmp_path / request.param, seed)
    ours = load_model(folder, create_backend("numpy"), show_progress=False).model
    return ours, hf_model, np.random.default_rng(seed), seed


@pytest.mark.parametrize("prompt_len", [1, 5, 23])
def test_prefill_logits_match_hf(tiny, prompt_len):
    ours, hf_model, rng, seed = tiny
    ids = rng.integers(0, ours.config.vocab_size, prompt_len).tolist()
    err = rel_err(prompt_logits(ours, ids), hf_logits(hf_model, ids))
    assert err <= TOLERANCE, f"seed {seed}: rel err {err:.2e}"


def test_incremental_decode_matches_hf(tiny):
    ours, hf_model, rng, seed = tiny
    ids = rng.integers(0, ours.config.vocab_size, 19).tolist()
    cache = SequenceKVCache(ours.backend, ours.config, len(ids))
    chunks = [ids[:9]] + [[t] for t in ids[9:]]  # prefill 9, then decode one at a time
    rows = [ours.compute_logits(_run(ours, cache, chunk)) for chunk in chunks]
    err = rel_err(np.concatenate(rows), hf_logits(hf_model, ids))
    assert err <= TOLERANCE, f"seed {seed}: rel err {err:.2e}"


def test_rms_norms_fold_into_the_projections_after_them(tiny):
    """A Llama-family block's RMSNorms hand their weights to the projection after them (layers.Norm's
    fold): the norm's weight all ones, QKV's and a dense gate/up's columns times it; a MoE block's
    post-attention norm (before its router and experts) and the final norm keep theirs."""
    ours, hf_model, _, _ = tiny
    if ours.config.norm != "rms":
        pytest.skip("LayerNorm models do not fold")
    hf_layer = hf_model.model.layers[0]
    layer = ours.layers[0]
    gamma = hf_layer.input_layernorm.weight.detach().numpy()
    assert layer.input_norm.folded and np.all(layer.input_norm.weight == 1.0)
    attn = hf_layer.self_attn
    qkv = np.concatenate([p.weight.detach().numpy() for p in (attn.q_proj, attn.k_proj, attn.v_proj)])
    np.testing.assert_allclose(layer.attn.qkv_weight, qkv * gamma, rtol=1e-6)
    post = hf_layer.post_attention_layernorm.weight.detach().numpy()
    dense = hasattr(hf_layer.mlp, "gate_proj")
    assert layer.post_norm.folded == dense
    if dense:
        gate_up = np.concatenate([hf_layer.mlp.gate_proj.weight.detach().numpy(),
                                  hf_layer.mlp.up_proj.weight.detach().numpy()])
        np.testing.assert_allclose(layer.mlp.gate_up_weight, gate_up * post, rtol=1e-6)
    else:
        np.testing.assert_array_equal(layer.post_norm.weight, post)
    assert not ours.norm.folded
    np.testing.assert_array_equal(ours.norm.weight, hf_model.model.norm.weight.detach().numpy())
