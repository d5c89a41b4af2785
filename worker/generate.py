"""Single-sequence generation: prefill the prompt, then one token a step.

Used by the CLI and the model tests until the engine core (batched,
paged) takes over serving. Yields token ids as they are sampled; turning
them into text is the caller's business.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from shardline.models.config import ModelConfig
from shardline.worker.sampling_params import SamplingParams
from shardline.worker.sequence_cache import SequenceKVCache


def _run(model: Any, cache: SequenceKVCache, token_ids: Sequence[int]) -> Any:
    """Forward the next tokens of the sequence; returns hidden [n, hidden]."""
    backend = model.backend
    start = cache.num_tokens
    ids = backend.xp.asarray(np.asarray(token_ids, dtype=np.int32))
    positions = backend.xp.asarray(np.arange(start, start + len(token_ids), dtype=np.int32))
    hidden = model.forward(ids, positions, cache.begin_step(len(token_ids)))
    cache.end_step()
    return hidden


def prompt_logits(model: Any, token_ids: Sequence[int]) -> np.ndarray:
    """Logits at every position of `token_ids` (teacher forcing), as float32 [n, vocab]."""
    cache = SequenceKVCache(model.backend, model.config, len(token_ids), model.num_kv_heads_per_rank)
    return model.backend.to_numpy(model.compute_logits(_run(model, cache, token_ids)))


def generate(model: Any, prompt_ids: Sequence[int], params: SamplingParams,
             eos_token_ids: Sequence[int] = ()) -> Iterator[int]:
    config: ModelConfig = model.config
    if not prompt_ids:
        raise ValueError("prompt must hold at least one token")
    total = len(prompt_ids) + params.max_tokens
    if total > config.max_position_embeddings:
        raise ValueError(f"max_tokens: prompt ({len(prompt_ids)}) + max_tokens ({params.max_tokens}) "
                         f"exceeds the model's context of {config.max_position_embeddings} tokens")
    backend = model.backend
    cache = SequenceKVCache(backend, config, total, model.num_kv_heads_per_rank)
    sampling = [backend.xp.asarray(np.asarray([v], dtype=t)) for v, t in (
        (params.temperature, np.float32), (params.top_k, np.int32), (params.top_p, np.float32),
        (params.seed, np.uint64))]
    step_input = list(prompt_ids)
    for index in range(params.max_tokens):
        hidden = _run(model, cache, step_input)
        logits = model.compute_logits(hidden[-1:])  # [1, vocab]
        offsets = backend.xp.asarray(np.asarray([index], dtype=np.int64))
        token = int(backend.to_numpy(backend.ops.sample(logits, *sampling, offsets))[0])
        yield token
        if token in eos_token_ids and not params.ignore_eos:
            return
        step_input = [token]
