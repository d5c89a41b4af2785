"""One entry point from a path to a ready model: `load_model`.

A folder is read as an HF checkpoint (config.json + safetensors), a `.gguf`
file through the gguf package. The config is validated before any weight
is read; every failure is a `ModelLoadError` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shardline.kernels.backend import Backend
from shardline.models.config import ModelConfig
from shardline.models.errors import ModelLoadError
from shardline.models.registry import lookup
from shardline.models.weights import Checkpoint, WeightReader
from shardline.parallel.pipeline import PipelineLayoutError, StagePlacement, resolve_stage
from shardline.parallel.experts import ExpertLayoutError, ExpertParallel, check_expert_layout
from shardline.parallel.sharding import TensorParallel


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    config: ModelConfig
    checkpoint: Checkpoint


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(path, "not found")
    if path.is_dir():
        from shardline.models.safetensors_checkpoint import SafetensorsCheckpoint
        return SafetensorsCheckpoint.open(path)
    if path.suffix == ".gguf":
        from shardline.models.gguf import GGUFCheckpoint
        return GGUFCheckpoint.open(path)
    raise ModelLoadError(path, "expected an HF checkpoint folder or a .gguf file")


def parse_config(checkpoint: Checkpoint) -> tuple[ModelConfig, type]:
    arch = lookup(checkpoint.config, checkpoint.path)
    try:
        return arch.parse(checkpoint.config), arch.model_class
    except KeyError as err:
        raise ModelLoadError(checkpoint.path, f"config is missing key {err}") from None
    except (ValidationError, ValueError, TypeError) as err:
        raise ModelLoadError(checkpoint.path, f"inconsistent config: {err}") from None


def load_model(path: str | Path, backend: Backend, show_progress: bool = True,
               tp: TensorParallel = TensorParallel(), placement: StagePlacement = StagePlacement(),
               ep: ExpertParallel = ExpertParallel()) -> LoadedModel:
    """Loads this rank's shard when `tp` spans several ranks, only its
    pipeline stage's layers under `placement`, and only its experts when
    `ep` spans several ranks (the whole model by default)."""
    checkpoint = open_checkpoint(path)
    config, model_class = parse_config(checkpoint)
    try:
        stage = resolve_stage(config, placement)
        check_expert_layout(config.num_experts, tp.size, ep.size)
    except (PipelineLayoutError, ExpertLayoutError) as err:
        raise ModelLoadError(checkpoint.path, str(err)) from None
    reader = WeightReader(checkpoint, backend, show_progress)
    try:
        model = model_class(backend, config, reader, tp, stage=stage, **({"ep": ep} if ep.size > 1 else {}))
    except ValueError as err:  # a layout the tp size cannot split
        raise ModelLoadError(checkpoint.path, str(err)) from None
    finally:
        reader.close()
    return LoadedModel(model, config, checkpoint)
