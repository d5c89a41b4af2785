"""An HF checkpoint folder: config.json plus memory-mapped *.safetensors.

Reads tensors lazily by name, as float32 NumPy arrays in HF's layout, so a
loader (or, later, a tensor-parallel rank) touches only the bytes it needs.
Every failure names the file and the problem. No model logic here.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from shardline.models.errors import ModelLoadError


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(path, "file not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(path, f"not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(path, "expected a JSON object at the top level")
    return data


def _bf16_bits(path: Path, name: str) -> np.ndarray:
    """safetensors' NumPy reader has no bfloat16: map the raw bits ourselves
    (header layout: u64 length, JSON, then the data block), uint16, lazily."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    info = header[name]
    begin, end = info["data_offsets"]
    bits = np.memmap(path, dtype=np.uint16, mode="r", offset=8 + header_len + begin,
                     shape=((end - begin) // 2,))
    return bits.reshape(info["shape"])


def _widen_bf16(bits: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(bits).astype(np.uint32) << 16).view(np.float32)


class SafetensorsCheckpoint:
    def __init__(self, folder: Path, config: dict[str, Any], files: dict[str, Path]):
        self.path = folder
        self.config = config
        self._files = files          # tensor name -> file holding it
        self._handles: dict[Path, Any] = {}

    @classmethod
    def open(cls, folder: str | Path) -> "SafetensorsCheckpoint":
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelLoadError(folder, "not a folder (expected an HF checkpoint folder or a .gguf file)")
        config = read_json(folder / "config.json")
        return cls(folder, config, _tensor_files(folder))

    def tensor_names(self) -> list[str]:
        return list(self._files)

    def file_of(self, name: str) -> Path:
        return self._files[name]

    def get_tensor(self, name: str) -> np.ndarray:
        if name not in self._files:
            raise ModelLoadError(self.path, f"tensor {name} is missing from the checkpoint")
        path = self._files[name]
        try:
            handle = self._handle(path)
            if handle.get_slice(name).get_dtype() == "BF16":
                return _widen_bf16(_bf16_bits(path, name))
            return handle.get_tensor(name).astype(np.float32, copy=False)
        except ModelLoadError:
            raise
        except Exception as err:  # safetensors raises several types for bad bytes
            raise ModelLoadError(path, f"cannot read tensor {name}: {err}") from None

    def tensor_shape(self, name: str) -> list[int]:
        return list(self._handle(self._files[name]).get_slice(name).get_shape())

    def get_tensor_part(self, name: str, axis: int, start: int, stop: int) -> np.ndarray:
        """Rows (axis 0) or columns (axis 1) [start, stop) without reading the rest."""
        path = self._files[name]
        index = (slice(None),) * axis + (slice(start, stop),)
        try:
            handle = self._handle(path)
            if handle.get_slice(name).get_dtype() == "BF16":
                return _widen_bf16(_bf16_bits(path, name)[index])
            return np.ascontiguousarray(handle.get_slice(name)[index]).astype(np.float32, copy=False)
        except Exception as err:
            raise ModelLoadError(path, f"cannot read tensor {name}: {err}") from None

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = _open_safetensors(path)
        return self._handles[path]


def _open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as err:
        raise ModelLoadError(path, f"not a valid safetensors file (truncated or corrupted?): {err}") from None


def _tensor_files(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(index, "has no 'weight_map' object")
        files = {name: folder / fname for name, fname in weight_map.items()}
        for path in set(files.values()):
            if not path.is_file():
                raise ModelLoadError(path, f"listed in {index.name} but not found")
        return files
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise ModelLoadError(folder, "no *.safetensors files found")
    files = {}
    for path in shards:
        for name in _open_safetensors(path).keys():
            files[name] = path
    return files
