"""Engines over tiny random Llama models for engine-core tests.

A tiny model keeps 32 requests of up to 1,500 prompt tokens fast on two
CPU cores; float64 keeps greedy choices free of rounding ties, so batched
and sequential runs must agree exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shardline.kernels.backend import create_backend
from shardline.models.loader import load_model
from shardline.worker.engine import EngineConfig, LLMEngine
from shardline.worker.offline import LocalModel

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 997


def save_tiny_llama(folder: Path, seed: int) -> Path:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=2048, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # spread the logits so greedy is far from ties
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_local(folder: Path, backend: str = "numpy", dtype: str = "float64") -> LocalModel:
    loaded = load_model(folder, create_backend(backend, dtype), show_progress=False)
    return LocalModel(loaded.model, tokenizer=None)


def make_engine(local: LocalModel, **overrides) -> LLMEngine:
    settings = dict(num_kv_blocks=2048, block_size_tokens=16, max_num_batched_tokens=512, max_num_seqs=64)
    settings.update(overrides)
    return LLMEngine(EngineConfig(**settings), local)


def random_prompts(rng: np.random.Generator, lengths) -> list[list[int]]:
    return [rng.integers(0, VOCAB, n).tolist() for n in lengths]
