"""KV cache for one sequence in contiguous per-layer arrays.

The simple cache behind single-sequence generation and the model tests;
the engine's paged cache (block tables, prefix reuse) replaces it for
batched serving. It implements the model's attention context: `attend`
stores this step's K/V at the sequence's next positions and attends over
everything so far.
"""

from __future__ import annotations

import math
from typing import Any

from shardline.kernels.backend import Backend
from shardline.models.config import ModelConfig


class SequenceKVCache:
    def __init__(self, backend: Backend, config: ModelConfig, max_tokens: int, num_kv_heads: int | None = None):
        # num_kv_heads: this rank's KV heads (all of them on a single rank)
        shape = (max_tokens, num_kv_heads or config.num_kv_heads, config.head_dim)  # per layer
        self.backend, self.max_tokens = backend, max_tokens
        self.k = [backend.zeros(shape) for _ in range(config.num_layers)]
        self.v = [backend.zeros(shape) for _ in range(config.num_layers)]
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.sliding_window = config.sliding_window
        self.num_tokens = 0          # tokens whose K/V are stored
        self._step_end = 0

    def begin_step(self, num_new_tokens: int) -> "SequenceKVCache":
        end = self.num_tokens + num_new_tokens
        if end > self.max_tokens:
            raise ValueError(f"sequence of {end} tokens exceeds the cache's {self.max_tokens}")
        self._step_end = end
        return self

    def end_step(self) -> None:
        self.num_tokens = self._step_end

    def attend(self, layer_index: int, q: Any, k: Any, v: Any, positions: Any, cos_sin: Any) -> Any:
        start, end = self.num_tokens, self._step_end
        if cos_sin is not None:
            q, k = self.backend.ops.rope(q, k, positions, cos_sin)
        self.k[layer_index][start:end] = k
        self.v[layer_index][start:end] = v
        return self.backend.ops.attention(q, self.k[layer_index][:end], self.v[layer_index][:end],
                                          self.scale, self.sliding_window)

    def paged_cache(self, layer_index: int) -> None:
        return None   # not paged: the projection's k and v come to attend
