"""Moves checkpoint tensors into backend arrays, checking shapes on the way.

A model's constructor asks the `WeightReader` for each tensor by its HF name
and the shape its config implies; a mismatch is reported with the file, the
tensor and both shapes, before any compute runs. A progress bar on stderr
counts the tensors. This module knows nothing about any architecture.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np
from tqdm import tqdm

from shardline.kernels.backend import Backend
from shardline.models.errors import ModelLoadError


class Checkpoint(Protocol):
    path: Any
    config: dict[str, Any]

    def tensor_names(self) -> list[str]: ...

    def get_tensor(self, name: str) -> np.ndarray: ...


class WeightReader:
    def __init__(self, checkpoint: Checkpoint, backend: Backend, show_progress: bool = True):
        self.checkpoint = checkpoint
        self.backend = backend
        self._names = set(checkpoint.tensor_names())
        self._progress = tqdm(total=len(self._names), desc="loading weights", unit="tensor",
                              disable=not show_progress, leave=False)

    def has(self, name: str) -> bool:
        return name in self._names

    def host(self, name: str, shape: Sequence[int]) -> np.ndarray:
        """The tensor as float32 on the host, checked against `shape`."""
        if name not in self._names:
            raise ModelLoadError(self.checkpoint.path, f"tensor {name} is missing from the checkpoint")
        array = self.checkpoint.get_tensor(name)
        if tuple(array.shape) != tuple(shape):
            where = getattr(self.checkpoint, "file_of", lambda _: self.checkpoint.path)(name)
            raise ModelLoadError(where, f"tensor {name} has shape {list(array.shape)} but the config "
                                        f"implies {list(shape)}")
        self._progress.update(1)
        return array

    def get(self, name: str, shape: Sequence[int]) -> Any:
        return self.backend.asarray(self.host(name, shape))

    def optional(self, name: str, shape: Sequence[int]) -> Any | None:
        return self.get(name, shape) if self.has(name) else None

    def concat(self, names: Sequence[str], shapes: Sequence[Sequence[int]], axis: int = 0) -> Any:
        """Several tensors fused into one (QKV, gate+up) along `axis`."""
        parts = [self.host(n, s) for n, s in zip(names, shapes)]
        return self.backend.asarray(np.concatenate(parts, axis=axis))

    def close(self) -> None:
        self._progress.close()
