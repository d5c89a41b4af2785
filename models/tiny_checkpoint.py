"""Writes a tiny random Llama checkpoint folder (config.json, safetensors,
a byte-level tokenizer.json) with NumPy and the `tokenizers` library only,
so launch tests and the GPU launch check can serve text without torch,
transformers or a download: `python -m shardline.models.tiny_checkpoint DIR`.

Four query and two KV heads, so tp=2 splits it. The weights are N(0, 0.3)
(logits far apart, so tensor-parallel rounding never flips a greedy token);
the text it writes is nonsense. Not a model for numerics tests.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIAL_TOKENS = ("<s>", "</s>")
VOCAB_MULTIPLE = 64   # unused special tokens pad the vocabulary: tp=2 halves stay GEMM-friendly on GPUs
HIDDEN_SIZE, INTERMEDIATE_SIZE, NUM_LAYERS, NUM_HEADS, NUM_KV_HEADS = 64, 128, 2, 4, 2
WEIGHT_STD = 0.3


def byte_level_tokenizer() -> Tokenizer:
    """Every byte is a token (no merges), then <s>, </s> and unused specials up to VOCAB_MULTIPLE."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    num_unused = -(len(vocab) + len(SPECIAL_TOKENS)) % VOCAB_MULTIPLE
    tokenizer.add_special_tokens([*SPECIAL_TOKENS, *(f"<unused{i}>" for i in range(num_unused))])
    return tokenizer


def llama_config(vocab_size: int, bos_id: int, eos_id: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
            "hidden_size": HIDDEN_SIZE, "intermediate_size": INTERMEDIATE_SIZE,
            "num_hidden_layers": NUM_LAYERS, "num_attention_heads": NUM_HEADS,
            "num_key_value_heads": NUM_KV_HEADS, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": bos_id,
            "eos_token_id": eos_id, "torch_dtype": "float32"}


def random_weights(config: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    hidden, head_dim = config["hidden_size"], config["hidden_size"] // config["num_attention_heads"]
    kv_size = config["num_key_value_heads"] * head_dim

    def normal(*shape: int) -> np.ndarray:
        return rng.normal(0.0, WEIGHT_STD, size=shape).astype(np.float32)

    weights = {"model.embed_tokens.weight": normal(config["vocab_size"], hidden),
               "model.norm.weight": np.ones(hidden, np.float32),
               "lm_head.weight": normal(config["vocab_size"], hidden)}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        weights.update({
            prefix + "self_attn.q_proj.weight": normal(hidden, hidden),
            prefix + "self_attn.k_proj.weight": normal(kv_size, hidden),
            prefix + "self_attn.v_proj.weight": normal(kv_size, hidden),
            prefix + "self_attn.o_proj.weight": normal(hidden, hidden),
            prefix + "mlp.gate_proj.weight": normal(config["intermediate_size"], hidden),
            prefix + "mlp.up_proj.weight": normal(config["intermediate_size"], hidden),
            prefix + "mlp.down_proj.weight": normal(hidden, config["intermediate_size"]),
            prefix + "input_layernorm.weight": np.ones(hidden, np.float32),
            prefix + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
        })
    return weights


def write_tiny_llama(folder: str | Path, seed: int = 0) -> Path:
    """Writes the checkpoint into `folder` (created if needed) and returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = byte_level_tokenizer()
    bos_id, eos_id = (tokenizer.token_to_id(t) for t in SPECIAL_TOKENS)
    config = llama_config(tokenizer.get_vocab_size(), bos_id, eos_id)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1], "add_bos_token": True}))
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    save_file(random_weights(config, seed), str(folder / "model.safetensors"))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random Llama checkpoint (for launch checks).")
    parser.add_argument("folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_tiny_llama(args.folder, args.seed))


if __name__ == "__main__":
    main()
