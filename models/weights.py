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
    """A file-backed checkpoint. Optional extras a reader uses when present:
    `tensor_shape(name)` + `get_tensor_part(name, axis, start, stop)` for
    sliced reads; a synthetic one (random weights) may instead define
    `has(name)` and `read(name, shape, axis, part)`."""

    path: Any
    config: dict[str, Any]

    def tensor_names(self) -> list[str]: ...

    def get_tensor(self, name: str) -> np.ndarray: ...


class WeightReader:
    def __init__(self, checkpoint: Checkpoint, backend: Backend, show_progress: bool = True):
        self.checkpoint = checkpoint
        self.backend = backend
        self._synthetic = hasattr(checkpoint, "read")
        self._names = set() if self._synthetic else set(checkpoint.tensor_names())
        self._progress = tqdm(total=None if self._synthetic else len(self._names), desc="loading weights",
                              unit="tensor", disable=not show_progress, leave=False)

    def has(self, name: str) -> bool:
        return self.checkpoint.has(name) if self._synthetic else name in self._names

    def host(self, name: str, shape: Sequence[int], axis: int = 0,
             part: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor as float32 on the host, checked against its full `shape`;
        with `part` = (start, stop), only that slice along `axis` (a
        tensor-parallel rank's share; safetensors reads just those bytes)."""
        if not self.has(name):
            raise ModelLoadError(self.checkpoint.path, f"tensor {name} is missing from the checkpoint")
        self._progress.update(1)
        if self._synthetic:
            return self.checkpoint.read(name, tuple(shape), axis, part)
        if part is not None and hasattr(self.checkpoint, "get_tensor_part"):
            self._check_shape(name, self.checkpoint.tensor_shape(name), shape)
            return self.checkpoint.get_tensor_part(name, axis, *part)
        array = self.checkpoint.get_tensor(name)
        self._check_shape(name, array.shape, shape)
        return array if part is None else np.take(array, np.arange(*part), axis=axis)

    def _check_shape(self, name: str, actual: Sequence[int], expected: Sequence[int]) -> None:
        if tuple(actual) != tuple(expected):
            where = getattr(self.checkpoint, "file_of", lambda _: self.checkpoint.path)(name)
            raise ModelLoadError(where, f"tensor {name} has shape {list(actual)} but the config "
                                        f"implies {list(expected)}")

    def get(self, name: str, shape: Sequence[int], axis: int = 0, part: tuple[int, int] | None = None) -> Any:
        return self.backend.asarray(self.host(name, shape, axis, part))

    def optional(self, name: str, shape: Sequence[int]) -> Any | None:
        return self.get(name, shape) if self.has(name) else None

    def concat(self, names: Sequence[str], shapes: Sequence[Sequence[int]],
               parts: Sequence[tuple[int, int] | None] | None = None, column_scale: np.ndarray | None = None) -> Any:
        """Several tensors (or row slices of them) fused along the first axis (QKV, gate+up);
        column_scale [columns]: each column times it on the host (float32, or float64 for a
        float64 backend) before the one rounding to the backend's dtype (an RMSNorm's weight folded in: layers.Norm)."""
        parts = parts or [None] * len(names)
        pieces = [self.host(n, s, 0, p) for n, s, p in zip(names, shapes, parts)]
        fused = np.concatenate(pieces, axis=0)
        if column_scale is not None:   # for float64, the float32 product is exact
            dtype = np.float64 if self.backend.dtype == "float64" else np.float32
            fused = np.multiply(fused, column_scale, dtype=dtype, out=fused if fused.dtype == dtype else None)
        return self.backend.asarray(fused)

    def close(self) -> None:
        self._progress.close()
