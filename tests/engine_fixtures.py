"""Engines over tiny random Llama models for engine-core tests.

A tiny model keeps 32 requests of up to 1,500 prompt tokens fast on two
CPU cores; float64 keeps greedy choices free of rounding ties, so batched
and sequential runs must agree exactly.
"""

from __future__ import annotations

import dataclasses

from pathlib import Path

import numpy as np
import pytest

from shardline.kernels.backend import create_backend
from shardline.models.loader import load_model
from shardline.worker.engine import EngineConfig, LLMEngine
from shardline.worker.kv_handoff import KVExport
from shardline.worker.offline import LocalModel
from shardline.worker.sampling_params import SamplingParams

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


def export_then_commit(local: LocalModel, rng: np.random.Generator,
                       through_chunks: bool = True) -> tuple[list[int], list[int], LLMEngine]:
    """A prompt prefilled on one engine, its KV moved (through the PushKV chunk
    protocol in shuffled order, or as it is) into another engine's reservation
    (whose cache holds the prompt's first two blocks), decoded there. Returns
    (tokens, tokens of one engine doing it all, the decode engine)."""
    # The prefill engine computes 16 tokens a step: the prompt's KV leaves in several pieces.
    # Decode ahead (a CUDA engine's default) neither exports KV nor takes reservations.
    prefill = make_engine(local, max_num_batched_tokens=16, decode_ahead=False)
    decode, reference = make_engine(local, decode_ahead=False), make_engine(local)
    shared = random_prompts(rng, [37])[0]
    prompt = shared + random_prompts(rng, [29])[0]
    params = SamplingParams(max_tokens=9, temperature=0.7, seed=int(rng.integers(1 << 30)), ignore_eos=True)
    want = reference.generate([prompt], [params])[0].token_ids
    decode.generate([shared + [5]], [SamplingParams(max_tokens=1)])   # caches two blocks of the prefix
    skip = decode.reserve_remote_kv("r", prompt, params)
    assert skip == 32
    prefill.add_request("p", prompt, dataclasses.replace(params, max_tokens=1), kv_export_from=skip)
    outputs = []
    while prefill.has_unfinished():
        outputs += prefill.step()
    pieces = [out.kv_export for out in outputs if out.kv_export is not None]
    export = join_pieces(pieces)
    assert export.start_token == skip and export.k.shape[1] == len(prompt) - skip and len(pieces) >= 2
    k, v = _through_chunks(local, export, skip, len(prompt), rng) if through_chunks else (export.k, export.v)
    decode.commit_remote_kv("r", skip, k, v, outputs[-1].new_token_ids[0])
    got = []
    while decode.has_unfinished():
        got += [t for out in decode.step() for t in out.new_token_ids]
        decode.scheduler.check_integrity()
    return got, want, decode


def join_pieces(pieces: list) -> KVExport:
    """An export request's pieces (one per step that computed some of its prompt), joined
    (on the GPU when they are cupy arrays)."""
    for before, after in zip(pieces, pieces[1:]):
        assert after.start_token == before.start_token + before.k.shape[1], "pieces must follow each other"
    xp = np
    if hasattr(pieces[0].k, "get"):
        import cupy as xp
    return KVExport(pieces[0].start_token, xp.concatenate([p.k for p in pieces], axis=1),
                    xp.concatenate([p.v for p in pieces], axis=1))


def _through_chunks(local: LocalModel, export, start: int, stop: int, rng: np.random.Generator):
    from shardline.worker.kv_transfer import KVAssembler, kv_chunks  # protobuf: not on every GPU image
    config = local.model.config
    assembler = KVAssembler(start, stop, config.num_layers, config.num_kv_heads, config.head_dim, export.k.dtype)
    chunks = list(kv_chunks("r", export, 0, None, max_chunk_bytes=4096))
    for chunk in rng.permutation(chunks[:-1]):
        assembler.add(chunk)
    assembler.check_complete()
    return assembler.k, assembler.v
