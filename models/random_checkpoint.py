"""A checkpoint of random weights for any HF config, made on the fly.

For benchmarks of real architectures' shapes (Llama-3-8B, Mixtral) without
files: the model's own loading code asks for each tensor by name and shape
(`read`), and the values come from one random pool per process (N(0, 1)
scaled by 1/sqrt(fan-in); norm weights are ones), taken at a per-name
offset. A multi-GB model is thus "read" at memory-copy speed, and every
rank of a tensor-parallel group sees the same full tensor. Not for
numerics that need independent weights: values repeat with the pool.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

POOL_SIZE = 1 << 24


class RandomCheckpoint:
    def __init__(self, config: dict[str, Any], seed: int = 0):
        self.path = f"<random {config.get('architectures', ['?'])[0]}>"
        self.config = config
        self._pool = np.random.default_rng(seed).standard_normal(2 * POOL_SIZE, dtype=np.float32)

    def tensor_names(self) -> list[str]:
        return []  # names are answered one by one through `has`

    def has(self, name: str) -> bool:
        # An lm_head exists only when the config unties it from the embedding.
        return not name.startswith("lm_head.") or not self.config.get("tie_word_embeddings", False)

    def get_tensor(self, name: str) -> np.ndarray:
        raise KeyError(f"{self.path}: tensors are made by `read`, which needs the shape of {name}")

    def read(self, name: str, shape: tuple[int, ...], axis: int = 0,
             part: tuple[int, int] | None = None) -> np.ndarray:
        if part is not None:
            index = (slice(None),) * axis + (slice(*part),)
            return np.ascontiguousarray(self.read(name, shape)[index])
        if "norm" in name or ".ln_" in name:
            return np.ones(shape, dtype=np.float32)
        count = int(np.prod(shape))
        start = zlib.crc32(name.encode()) % POOL_SIZE
        flat = np.resize(self._pool[start:start + POOL_SIZE], count)
        scale = shape[-1] ** -0.5 if len(shape) > 1 else 0.02
        return (flat * np.float32(scale)).reshape(shape)
