"""Read a GGUF checkpoint as if it were a Hugging Face one.

`GGUFCheckpoint.open(path)` memory-maps the file with `gguf.GGUFReader` and
offers what the rest of shardline expects from an HF folder: a
`config.json`-style dict, tensors under HF state-dict names in HF layout
(float32, dequantized with `gguf.quants.dequantize`), and the tokenizer
metadata that `worker/tokenizer.py` turns into a tokenizer.

It must not import torch, transformers or any GPU code, and it must not
shard: the weight loader slices what `get_tensor` returns. Every problem with
the file itself surfaces as `ModelLoadError` naming the file.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from shardline.models.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gpt2")

# GGUF tensor name -> HF name, for tensors outside the repeated blocks.
_GLOBAL_NAMES = {
    "llama": {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    },
    "gpt2": {
        "token_embd.weight": "transformer.wte.weight",
        "position_embd.weight": "transformer.wpe.weight",
        "output_norm.weight": "transformer.ln_f.weight",
        "output_norm.bias": "transformer.ln_f.bias",
        "output.weight": "lm_head.weight",
    },
}
# Per block: GGUF suffix after "blk.{i}." -> HF suffix after the layer prefix.
_LLAMA_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
}
_GPT2_BLOCK_NAMES = {
    f"{gguf_part}.{kind}": f"{hf_part}.{kind}"
    for gguf_part, hf_part in [
        ("attn_norm", "ln_1"), ("attn_qkv", "attn.c_attn"), ("attn_output", "attn.c_proj"),
        ("ffn_norm", "ln_2"), ("ffn_up", "mlp.c_fc"), ("ffn_down", "mlp.c_proj"),
    ]
    for kind in ("weight", "bias")
}
_BLOCK_NAMES = {"llama": _LLAMA_BLOCK_NAMES, "qwen2": _LLAMA_BLOCK_NAMES, "gpt2": _GPT2_BLOCK_NAMES}
_LAYER_PREFIX = {"llama": "model.layers.{i}.", "qwen2": "model.layers.{i}.", "gpt2": "transformer.h.{i}."}
# Tensors a file may lack; any other table entry is required.
_OPTIONAL = {"output.weight", "attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias"}
_QWEN2_REQUIRED_BIASES = {"attn_q.bias", "attn_k.bias", "attn_v.bias"}
# llama.cpp stores these GPT-2 Conv1D weights as [out, in]; HF keeps [in, out].
_GPT2_TRANSPOSED = {"attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight"}


@dataclasses.dataclass(frozen=True)
class GGUFTokenizerData:
    """The `tokenizer.*` metadata of a GGUF file, under readable names."""

    model: str  # tokenizer.ggml.model: "gpt2" is byte-level BPE, "llama" is SentencePiece
    pre: str | None  # tokenizer.ggml.pre: which llama.cpp pre-tokenizer the merges were learned with
    tokens: list[str]
    token_types: list[int]  # 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    merges: list[str]  # "a b" pairs, best first
    bos_token_id: int | None
    eos_token_id: int | None
    eot_token_id: int | None
    eom_token_id: int | None
    pad_token_id: int | None
    unk_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | None


class GGUFCheckpoint:
    """One GGUF file, memory-mapped; tensors are read on demand."""

    def __init__(self, path: Path, reader: gguf.GGUFReader):
        self.path = path
        self._reader = reader
        self.architecture: str = self._required("general.architecture")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                path, f"GGUF architecture {self.architecture!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        self._tensors = {t.name: t for t in reader.tensors}
        self.config: dict[str, Any] = _build_config(self)
        self._hf_to_gguf = _map_tensor_names(self)
        self._check_types()

    @classmethod
    def open(cls, path: str | Path) -> GGUFCheckpoint:
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(path, "no such file")
        with path.open("rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelLoadError(path, f"not a GGUF file (starts with {magic!r}, expected b'GGUF')")
        try:
            reader = gguf.GGUFReader(path)
        except Exception as e:  # the reader raises ValueError, IndexError, ... on bad bytes
            raise ModelLoadError(path, f"truncated or corrupted GGUF file: {type(e).__name__}: {e}") from e
        return cls(path, reader)

    # -- metadata -----------------------------------------------------------

    def metadata(self, key: str, default: Any = None) -> Any:
        """The value of one metadata key (lists for arrays), or `default`."""
        field = self._reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise ModelLoadError(self.path, f"metadata key {key!r} is unreadable: {e}") from e

    def _required(self, key: str) -> Any:
        value = self.metadata(key)
        if value is None:
            raise ModelLoadError(self.path, f"metadata key {key!r} is missing")
        return value

    def tokenizer_data(self) -> GGUFTokenizerData:
        model = self.metadata("tokenizer.ggml.model")
        tokens = self.metadata("tokenizer.ggml.tokens")
        if model is None or tokens is None:
            raise ModelLoadError(self.path, "the file has no tokenizer (tokenizer.ggml.model/tokens missing)")
        token_types = self.metadata("tokenizer.ggml.token_type") or [1] * len(tokens)

        def token_id(name: str) -> int | None:
            return self.metadata(f"tokenizer.ggml.{name}_token_id")

        return GGUFTokenizerData(
            model=model, pre=self.metadata("tokenizer.ggml.pre"),
            tokens=tokens, token_types=token_types,
            merges=self.metadata("tokenizer.ggml.merges") or [],
            bos_token_id=token_id("bos"), eos_token_id=token_id("eos"),
            eot_token_id=token_id("eot"), eom_token_id=token_id("eom"),
            pad_token_id=token_id("padding"), unk_token_id=token_id("unknown"),
            # Like transformers: SentencePiece vocabularies add BOS unless told otherwise.
            add_bos_token=bool(self.metadata("tokenizer.ggml.add_bos_token", model == "llama")),
            add_eos_token=bool(self.metadata("tokenizer.ggml.add_eos_token", False)),
            chat_template=self.metadata("tokenizer.chat_template"),
        )

    # -- tensors ------------------------------------------------------------

    def tensor_names(self) -> list[str]:
        """HF state-dict names of the tensors this file holds, in file order."""
        return list(self._hf_to_gguf)

    def gguf_name(self, name: str) -> str:
        """The file's own name for an HF tensor name (for messages and debugging)."""
        if name not in self._hf_to_gguf:
            raise KeyError(f"{self.path.name} has no tensor {name!r}")
        return self._hf_to_gguf[name]

    def get_tensor(self, name: str) -> np.ndarray:
        """One tensor as float32, shaped and ordered as HF's state dict has it."""
        gguf_name = self.gguf_name(name)
        tensor = self._tensors[gguf_name]
        try:
            flat = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise ModelLoadError(self.path, _type_problem(gguf_name, name, tensor.tensor_type)) from e
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims innermost first
        weights = np.array(flat, dtype=np.float32).reshape(shape)
        return _to_hf_layout(self, gguf_name, weights)

    def _check_types(self) -> None:
        for hf_name, gguf_name in self._hf_to_gguf.items():
            qtype = self._tensors[gguf_name].tensor_type
            if not _can_dequantize(qtype):
                raise ModelLoadError(self.path, _type_problem(gguf_name, hf_name, qtype))


def _type_problem(gguf_name: str, hf_name: str, qtype: gguf.GGMLQuantizationType) -> str:
    return (
        f"tensor {gguf_name} ({hf_name}) is stored as {qtype.name}, "
        "which gguf.quants.dequantize cannot read"
    )


@functools.cache
def _can_dequantize(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether the installed gguf package can dequantize this type (probed on one zero block)."""
    _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, block_bytes), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _to_hf_layout(ckpt: GGUFCheckpoint, gguf_name: str, weights: np.ndarray) -> np.ndarray:
    suffix = gguf_name.split(".", 2)[-1] if gguf_name.startswith("blk.") else gguf_name
    if ckpt.architecture == "llama" and suffix.startswith(("attn_q.", "attn_k.")):
        # Only llama-arch files are permuted; llama.cpp's Qwen2 converter keeps HF rows.
        cfg = ckpt.config
        num_heads = cfg["num_attention_heads"] if suffix.startswith("attn_q.") else cfg["num_key_value_heads"]
        return unpermute_rope_rows(weights, num_heads)
    if ckpt.architecture == "gpt2" and suffix in _GPT2_TRANSPOSED:
        return np.ascontiguousarray(weights.T)
    return weights


def unpermute_rope_rows(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a llama Q or K projection (weight or bias).

    HF keeps each head's rotary pairs as (first half, second half) of the head
    dim ("rotate_half"); llama.cpp's converter interleaves them for its
    adjacent-pair RoPE: row h*d + 2*j + k holds HF row h*d + k*(d/2) + j.
    Reading the rows as [head, d/2, 2] and swapping the last two axes back
    gives [head, 2, d/2], which is HF's order.
    """
    rows = weights.shape[0]
    half_head_dim = rows // num_heads // 2
    per_head = weights.reshape(num_heads, half_head_dim, 2, *weights.shape[1:])
    return np.ascontiguousarray(per_head.swapaxes(1, 2)).reshape(weights.shape)


# -- config -------------------------------------------------------------------


def _float(value: float) -> float:
    """A float32 from the file, spelled as short as it was written (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _build_config(ckpt: GGUFCheckpoint) -> dict[str, Any]:
    arch = ckpt.architecture
    meta = functools.partial(_arch_key, ckpt)
    vocab_size = meta("vocab_size")
    if vocab_size is None:
        tokens = ckpt.metadata("tokenizer.ggml.tokens")
        embedding = ckpt._tensors.get("token_embd.weight")
        vocab_size = len(tokens) if tokens else int(embedding.shape[-1]) if embedding is not None else None
    common = {
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in ckpt._tensors,
        "bos_token_id": ckpt.metadata("tokenizer.ggml.bos_token_id"),
        "eos_token_id": ckpt.metadata("tokenizer.ggml.eos_token_id"),
    }
    pad_token_id = ckpt.metadata("tokenizer.ggml.padding_token_id")
    if pad_token_id is not None:
        common["pad_token_id"] = pad_token_id
    if arch == "gpt2":
        return {**_gpt2_config(ckpt), **common}
    return {**_llama_like_config(ckpt), **common}


def _arch_key(ckpt: GGUFCheckpoint, key: str, required: bool = False) -> Any:
    full_key = f"{ckpt.architecture}.{key}"
    return ckpt._required(full_key) if required else ckpt.metadata(full_key)


def _llama_like_config(ckpt: GGUFCheckpoint) -> dict[str, Any]:
    arch = ckpt.architecture
    meta = functools.partial(_arch_key, ckpt)
    num_heads = meta("attention.head_count", required=True)
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch,
        "hidden_size": meta("embedding_length", required=True),
        "intermediate_size": meta("feed_forward_length", required=True),
        "num_hidden_layers": meta("block_count", required=True),
        "num_attention_heads": num_heads,
        "num_key_value_heads": meta("attention.head_count_kv") or num_heads,
        "hidden_act": "silu",
        "rms_norm_eps": _float(meta("attention.layer_norm_rms_epsilon", required=True)),
        "rope_theta": _float(meta("rope.freq_base") or 10000.0),
        "max_position_embeddings": meta("context_length", required=True),
    }
    # transformers reads llama's head_dim from the rope dimension; qwen2 has none of its own.
    head_dim = meta("attention.key_length") or (meta("rope.dimension_count") if arch == "llama" else None)
    if head_dim is not None:
        config["head_dim"] = head_dim
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in ckpt._tensors
        config["mlp_bias"] = False
    else:
        config["use_sliding_window"] = False
    rope_scaling = _rope_scaling(ckpt)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _rope_scaling(ckpt: GGUFCheckpoint) -> dict[str, Any] | None:
    meta = functools.partial(_arch_key, ckpt)
    rope_type = meta("rope.scaling.type")
    if rope_type in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": rope_type}
    for gguf_key, hf_key in [
        ("factor", "factor"), ("attn_factor", "attention_factor"),
        ("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
    ]:
        value = meta(f"rope.scaling.{gguf_key}")
        if value is not None:
            scaling[hf_key] = _float(value)
    original_context = meta("rope.scaling.original_context_length")
    if original_context is not None:
        scaling["original_max_position_embeddings"] = original_context
    return scaling


def _gpt2_config(ckpt: GGUFCheckpoint) -> dict[str, Any]:
    meta = functools.partial(_arch_key, ckpt)
    context = meta("context_length", required=True)
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": meta("embedding_length", required=True),
        "n_layer": meta("block_count", required=True),
        "n_head": meta("attention.head_count", required=True),
        "n_positions": context,
        "n_ctx": context,
        "n_inner": meta("feed_forward_length"),
        "activation_function": "gelu_new",
        "layer_norm_epsilon": _float(meta("attention.layer_norm_epsilon", required=True)),
    }


# -- tensor names ----------------------------------------------------------------


def _map_tensor_names(ckpt: GGUFCheckpoint) -> dict[str, str]:
    """HF name -> GGUF name for every tensor the file holds; raises for required ones it lacks."""
    arch, present = ckpt.architecture, ckpt._tensors
    num_layers = ckpt.config.get("num_hidden_layers", ckpt.config.get("n_layer"))
    block_names = _BLOCK_NAMES[arch]
    # A block tensor present in any block (a bias, say) must be in all of them.
    wanted_suffixes = {
        suffix for suffix in block_names
        if suffix not in _OPTIONAL
        or (arch == "qwen2" and suffix in _QWEN2_REQUIRED_BIASES)
        or any(f"blk.{i}.{suffix}" in present for i in range(num_layers))
    }
    expected: dict[str, str] = {}
    for gguf_name, hf_name in _GLOBAL_NAMES.get(arch, _GLOBAL_NAMES["llama"]).items():
        if gguf_name not in _OPTIONAL or gguf_name in present:
            expected[gguf_name] = hf_name
    prefix = _LAYER_PREFIX[arch]
    for i in range(num_layers):
        for suffix in block_names:
            if suffix in wanted_suffixes:
                expected[f"blk.{i}.{suffix}"] = prefix.format(i=i) + block_names[suffix]
    missing = [f"{g} ({h})" for g, h in expected.items() if g not in present]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(ckpt.path, f"missing tensor(s) the config implies: {shown}")
    order = {name: index for index, name in enumerate(present)}
    return {expected[g]: g for g in sorted(expected, key=order.__getitem__)}
