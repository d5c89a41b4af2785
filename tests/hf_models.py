"""Tiny random-weight HF models for numerics tests (built offline).

Each entry of TINY_CONFIGS builds an HF config of an odd size (hidden 80,
5 heads, 1 KV head, vocab 503 where the family allows). `save_tiny` makes
the torch model with fresh random weights, saves it as an HF checkpoint
folder and returns (folder, torch model in float32, eval mode).
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=503, hidden_size=80, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=256)


def _llama3():
    return transformers.LlamaConfig(**COMMON, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})


TINY_CONFIGS = {
    "llama2": lambda: transformers.LlamaConfig(**COMMON),
    "llama3": _llama3,
    "smollm2_tied": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=True, rope_theta=100000.0),
    "mistral_window": lambda: transformers.MistralConfig(**COMMON, sliding_window=7),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen2_yarn": lambda: transformers.Qwen2Config(**COMMON, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=503, n_embd=80, n_layer=3, n_head=5, n_positions=256),
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
}

MODEL_CLASSES = {
    "llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM, "gpt2": transformers.GPT2LMHeadModel,
    "mixtral": transformers.MixtralForCausalLM,
}


def save_tiny(name: str, folder: Path, seed: int):
    config = TINY_CONFIGS[name]()
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = MODEL_CLASSES[config.model_type](config).float().eval()
    with torch.no_grad():  # larger than the 0.02 init so that every layer matters
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.15)
            elif param.dim() == 1:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def hf_logits(model, ids: list[int]):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()
