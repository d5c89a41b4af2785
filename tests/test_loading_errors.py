"""Bad checkpoints give a ModelLoadError naming the file and the problem."""

from __future__ import annotations

import json
import shutil

import pytest

from hf_models import save_tiny
from shardline.kernels.backend import create_backend
from shardline.models.errors import ModelLoadError, UnknownArchitectureError
from shardline.models.loader import load_model


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    folder, _ = save_tiny("llama2", tmp_path_factory.mktemp("ckpt") / "llama", seed=0)
    return folder


@pytest.fixture
def folder(good_folder, tmp_path):
    return shutil.copytree(good_folder, tmp_path / "copy")


def load(path):
    return load_model(path, create_backend("numpy"), show_progress=False)


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="nowhere: not found"):
        load(tmp_path / "nowhere")


def test_missing_config(folder):
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config\.json: file not found"):
        load(folder)


def test_config_not_json(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json: not valid JSON"):
        load(folder)


def test_unknown_architecture_lists_known(folder):
    edit_config(folder, architectures=["FancyNewForCausalLM"])
    with pytest.raises(UnknownArchitectureError, match="FancyNewForCausalLM.*LlamaForCausalLM.*GPT2LMHeadModel"):
        load(folder)


def test_inconsistent_heads(folder):
    edit_config(folder, num_key_value_heads=2)  # 5 heads are not a multiple of 2
    with pytest.raises(ModelLoadError, match="num_key_value_heads"):
        load(folder)


def test_shape_mismatch_names_tensor(folder):
    edit_config(folder, intermediate_size=100)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.gate_proj\.weight "
                                             r"has shape \[96, 80\] but the config implies \[100, 80\]"):
        load(folder)


def test_missing_tensor(folder):
    edit_config(folder, num_hidden_layers=4)
    with pytest.raises(ModelLoadError, match=r"tensor model\.layers\.3\.\S+ is missing"):
        load(folder)


@pytest.mark.parametrize("keep_fraction", [0.5, 0.999])
def test_truncated_safetensors(folder, keep_fraction):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: .*(truncated|corrupted)"):
        load(folder)


def test_garbage_safetensors(folder):
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage]" + bytes(64))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        load(folder)


def test_not_a_model_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"abc")
    with pytest.raises(ModelLoadError, match="weights.bin: expected an HF checkpoint folder or a .gguf file"):
        load(path)
