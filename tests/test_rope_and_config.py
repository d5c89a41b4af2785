"""Rope tables against HF's rope init functions; config parsing; sampling params."""

from __future__ import annotations

import numpy as np
import pytest

from hf_models import TINY_CONFIGS
from shardline.kernels.rope import inv_frequencies, rope_cos_sin
from shardline.models.loader import parse_config
from shardline.worker.sampling_params import SamplingParams

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 3.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "beta_fast": 16,
     "beta_slow": 2, "attention_factor": 1.3},
]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: (s or {}).get("rope_type", "default"))
@pytest.mark.parametrize("head_dim", [64, 128])
def test_inv_freq_matches_hf(scaling, head_dim):
    params = {"rope_type": "default", "rope_theta": 500000.0, **(scaling or {})}
    config = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                      max_position_embeddings=131072, rope_parameters=params)
    hf_rotary = LlamaRotaryEmbedding(config=config)
    ref, ref_factor = hf_rotary.inv_freq, hf_rotary.attention_scaling
    ours, factor = inv_frequencies(head_dim, 500000.0, scaling, 131072)
    np.testing.assert_allclose(ours, ref.double().numpy(), rtol=1e-6)
    assert factor == pytest.approx(float(ref_factor), rel=1e-6)


def test_cos_sin_layout():
    table = rope_cos_sin(8, 5, 10000.0)
    inv = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
    np.testing.assert_allclose(table[3, :4], np.cos(3 * inv))
    np.testing.assert_allclose(table[3, 4:], np.sin(3 * inv))


def test_unsupported_rope_type_is_named():
    with pytest.raises(ValueError, match="rope_type 'dynamic' is not supported"):
        inv_frequencies(64, 10000.0, {"rope_type": "dynamic", "factor": 2.0}, 4096)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_parse_config_of_every_family(name):
    hf = TINY_CONFIGS[name]()
    hf.architectures = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                         "gpt2": "GPT2LMHeadModel", "mixtral": "MixtralForCausalLM"}[hf.model_type]]

    class Checkpoint:
        path, config = "tiny", hf.to_dict()

    config, _ = parse_config(Checkpoint)
    assert (config.hidden_size, config.num_heads, config.vocab_size) == (80, 5, 503)
    assert config.num_kv_heads == (5 if name == "gpt2" else 1)


@pytest.mark.parametrize("field, value", [("max_tokens", 0), ("temperature", -0.5), ("top_p", 0.0),
                                          ("top_p", 1.5), ("top_k", -1), ("seed", -3)])
def test_sampling_params_reject_bad_values_by_name(field, value):
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**{field: value})
