"""GGUFCheckpoint against transformers' own GGUF loader, on the embedded
SmolLM2 file and on tiny files written here in every type gguf can write."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf_fixtures import (
    TINY,
    hf_gguf_state_dict,
    llama_cpp_permute,
    smollm2_gguf_path,
    writable_types,
    write_tiny_gguf,
)

from shardline.models.errors import ModelLoadError
from shardline.models.gguf import GGUFCheckpoint, unpermute_rope_rows

F32 = gguf.GGMLQuantizationType.F32
F16 = gguf.GGMLQuantizationType.F16
WRITABLE = writable_types()


@pytest.fixture(scope="module")
def smollm2() -> GGUFCheckpoint:
    return GGUFCheckpoint.open(smollm2_gguf_path())


@pytest.fixture(scope="module")
def smollm2_hf_tensors() -> dict[str, np.ndarray]:
    return hf_gguf_state_dict(smollm2_gguf_path())


# -- the embedded SmolLM2 file --------------------------------------------------


def test_smollm2_config_matches_transformers(smollm2):
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf_path()
    hf = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()
    ours = smollm2.config
    assert ours["architectures"] == ["LlamaForCausalLM"]
    for key in ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "attention_bias", "mlp_bias"]:
        assert ours[key] == hf[key], key
    # transformers keeps the float32 read as is (9.9999997e-06); we spell it as written (1e-05).
    assert ours["rms_norm_eps"] == pytest.approx(hf["rms_norm_eps"], rel=1e-6)
    hf_theta = hf.get("rope_theta") or hf["rope_parameters"]["rope_theta"]
    assert ours["rope_theta"] == pytest.approx(hf_theta, rel=1e-6)
    assert "rope_scaling" not in ours


def test_smollm2_tensor_names(smollm2):
    names = smollm2.tensor_names()
    assert len(names) == 2 + 30 * 9  # embedding, final norm, 9 per layer; tied: no lm_head
    assert names[0] == "model.embed_tokens.weight"
    assert "model.norm.weight" in names and "lm_head.weight" not in names
    assert "model.layers.29.self_attn.k_proj.weight" in names
    assert smollm2.get_tensor("model.layers.0.self_attn.k_proj.weight").shape == (3 * 64, 576)
    assert smollm2.get_tensor("model.embed_tokens.weight").shape == (49152, 576)


SAMPLE = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.7.self_attn.k_proj.weight",
    "model.layers.29.self_attn.q_proj.weight",
    "model.layers.29.self_attn.v_proj.weight",
    "model.layers.3.self_attn.o_proj.weight",
    "model.layers.11.mlp.down_proj.weight",
    "model.layers.11.mlp.gate_proj.weight",
    "model.layers.5.input_layernorm.weight",
    "model.norm.weight",
]


@pytest.mark.parametrize("name", SAMPLE)
def test_smollm2_tensor_matches_transformers(smollm2, smollm2_hf_tensors, name):
    ours = smollm2.get_tensor(name)
    reference = smollm2_hf_tensors[name]
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)


def test_smollm2_names_match_transformers(smollm2, smollm2_hf_tensors):
    assert set(smollm2.tensor_names()) == set(smollm2_hf_tensors)


def test_smollm2_tokenizer_metadata(smollm2):
    data = smollm2.tokenizer_data()
    assert (data.model, data.pre) == ("gpt2", "smollm")
    assert len(data.tokens) == len(data.token_types) == 49152
    assert data.tokens[data.eos_token_id] == "<|im_end|>"
    assert not data.add_bos_token
    assert "<|im_start|>" in data.chat_template


# -- tiny files ----------------------------------------------------------------------


def _expected(arch: str, name: str, original: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """The HF tensor after a round trip through `qtype`, computed without un-permuting anything.

    ggml quantizes each row on its own, so permuting rows commutes with
    quantizing them: llama's Q/K come back as plain quantize+dequantize of the
    HF tensor. GPT-2's Conv1D weights are stored transposed, so their rows are
    HF's columns.
    """
    if original.ndim == 1 or qtype == F32:
        return original
    transposed = arch == "gpt2" and name.split(".", 2)[-1] in (
        "attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight"
    )
    stored = original.T if transposed else original
    if qtype == F16:
        round_trip = stored.astype(np.float16).astype(np.float32)
    else:
        round_trip = gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(stored), qtype), qtype)
    return round_trip.T if transposed else round_trip


@pytest.mark.parametrize("qtype", WRITABLE, ids=lambda t: t.name)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_tiny_tensors_round_trip(tmp_path, arch, qtype):
    path = tmp_path / f"tiny-{arch}.gguf"
    originals = write_tiny_gguf(path, arch, qtype, untied=arch != "qwen2", bias=arch == "llama")
    ckpt = GGUFCheckpoint.open(path)
    names = ckpt.tensor_names()
    assert sorted(ckpt.gguf_name(name) for name in names) == sorted(originals)
    for hf_name in names:
        gguf_name = ckpt.gguf_name(hf_name)
        ours = ckpt.get_tensor(hf_name)
        expected = _expected(arch, gguf_name, originals[gguf_name], qtype)
        assert ours.dtype == np.float32 and ours.shape == expected.shape, hf_name
        np.testing.assert_array_equal(ours, expected, err_msg=hf_name)


@pytest.mark.parametrize("qtype", WRITABLE, ids=lambda t: t.name)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_tiny_tensors_match_transformers(tmp_path, arch, qtype):
    path = tmp_path / f"tiny-{arch}.gguf"
    write_tiny_gguf(path, arch, qtype, untied=arch != "qwen2")
    ckpt = GGUFCheckpoint.open(path)
    reference = hf_gguf_state_dict(path)
    assert set(ckpt.tensor_names()) == set(reference)
    for name in ckpt.tensor_names():
        np.testing.assert_array_equal(ckpt.get_tensor(name), reference[name], err_msg=name)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_tiny_config_matches_transformers(tmp_path, arch):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / f"tiny-{arch}.gguf"
    write_tiny_gguf(path, arch, F32, untied=arch == "llama")
    ours = GGUFCheckpoint.open(path).config
    hf = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()
    assert ours["vocab_size"] == TINY["vocab"] == hf["vocab_size"]  # from the token list
    assert ours["tie_word_embeddings"] == (arch != "llama") == hf["tie_word_embeddings"]
    if arch == "gpt2":
        assert ours["architectures"] == ["GPT2LMHeadModel"]
        assert (ours["n_embd"], ours["n_layer"], ours["n_head"]) == (hf["n_embd"], hf["n_layer"], hf["n_head"])
        assert ours["n_positions"] == TINY["context"] and ours["n_inner"] == TINY["intermediate"]
        assert ours["layer_norm_epsilon"] == pytest.approx(hf["layer_norm_epsilon"], rel=1e-6)
        return
    assert ours["architectures"] == ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"]
    for key in ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "bos_token_id", "eos_token_id"]:
        assert ours[key] == hf[key], key
    assert ours["rms_norm_eps"] == pytest.approx(hf["rms_norm_eps"], rel=1e-6)


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(1)
    weights = rng.standard_normal((3 * 8, 5)).astype(np.float32)  # 3 heads of dim 8
    np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(weights, 3), 3), weights)
    bias = rng.standard_normal(3 * 8).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(bias, 3), 3), bias)


# -- errors -----------------------------------------------------------------------------------


def _load_error(path) -> str:
    with pytest.raises(ModelLoadError) as info:
        GGUFCheckpoint.open(path)
    assert path.name in str(info.value)
    return info.value.problem


def test_missing_file(tmp_path):
    assert "no such file" in _load_error(tmp_path / "absent.gguf")


def test_truncated_smollm2(tmp_path):
    source = smollm2_gguf_path()
    path = tmp_path / "half.gguf"
    with source.open("rb") as f:
        path.write_bytes(f.read(source.stat().st_size // 2))
    assert "truncated or corrupted" in _load_error(path)


def test_truncated_tiny_header(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "llama", F32)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:200])
    assert "truncated or corrupted" in _load_error(cut)


NOT_GGUF = [np.random.default_rng(2).bytes(4096), b"", b"GG"]


@pytest.mark.parametrize("content", NOT_GGUF, ids=["random", "empty", "short"])
def test_not_a_gguf(tmp_path, content):
    path = tmp_path / "noise.gguf"
    path.write_bytes(content)
    assert "not a GGUF file" in _load_error(path)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(path, "phi3")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    problem = _load_error(path)
    assert "'phi3'" in problem and "llama, qwen2, gpt2" in problem


def test_unsupported_quant_type(tmp_path):
    # Q8_1 is a type gguf can lay out but not dequantize.
    q8_1 = gguf.GGMLQuantizationType.Q8_1
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[q8_1]
    data = np.zeros((TINY["intermediate"], TINY["hidden"] // block_size * block_bytes), dtype=np.uint8)
    path = tmp_path / "q8_1.gguf"
    write_tiny_gguf(path, "llama", F32, drop=("blk.1.ffn_up.weight",), raw={"blk.1.ffn_up.weight": (data, q8_1)})
    problem = _load_error(path)
    assert "blk.1.ffn_up.weight" in problem and "Q8_1" in problem


def test_missing_tensor(tmp_path):
    path = tmp_path / "holey.gguf"
    write_tiny_gguf(path, "llama", F32, drop=("blk.1.attn_k.weight",))
    problem = _load_error(path)
    assert "blk.1.attn_k.weight" in problem and "model.layers.1.self_attn.k_proj.weight" in problem


def test_missing_qwen2_bias(tmp_path):
    path = tmp_path / "nobias.gguf"
    write_tiny_gguf(path, "qwen2", F32, drop=("blk.0.attn_q.bias", "blk.1.attn_q.bias"))
    assert "model.layers.0.self_attn.q_proj.bias" in _load_error(path)


def test_unknown_tensor_name_is_a_key_error(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "llama", F32)
    with pytest.raises(KeyError):
        GGUFCheckpoint.open(path).get_tensor("lm_head.weight")  # tied: not in the file
