"""Model shapes the benchmarks build (HF configs, random weights) and the
roofline arithmetic over them: parameters, bytes a decode step must read,
FLOPs a prefill must do. No GPU code: tests/test_bench_shapes.py checks the
counts against transformers models of the same configs.

Shapes too big for one GPU beside the HF baseline are cut to fewer layers
(`num_hidden_layers`); every per-step ratio to the roofline stays meaningful,
since both sides scale with the layers.
"""

from __future__ import annotations

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}
# Llama-3-70B's layers, 12 of its 80: about 25 GB of bf16 weights.
LLAMA3_70B_CUT = {**LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
                  "num_hidden_layers": 12}
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 8192, "rope_theta": 1e6, "rms_norm_eps": 1e-5, "num_local_experts": 8,
    "num_experts_per_tok": 2, "tie_word_embeddings": False,
}
# Mixtral-8x7B's layers, 8 of its 32: about 23 GB of bf16 weights.
MIXTRAL_8X7B_CUT = {**MIXTRAL_8X7B, "num_hidden_layers": 8}
SMOLLM2_135M = {**LLAMA3_8B, "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                "rope_theta": 100000.0, "tie_word_embeddings": True}

SHAPES = {"llama3-8b": LLAMA3_8B, "llama3-70b-cut": LLAMA3_70B_CUT, "mixtral-8x7b-cut": MIXTRAL_8X7B_CUT,
          "smollm2-135m": SMOLLM2_135M}


def _layer_parts(hf: dict) -> tuple[int, int, int]:
    """Per layer: (attention and norm parameters, one expert's (or the MLP's) parameters, router)."""
    h, i = hf["hidden_size"], hf["intermediate_size"]
    kv = h * hf["num_key_value_heads"] // hf["num_attention_heads"]
    attention = h * h * 2 + 2 * h * kv + 2 * h
    experts = hf.get("num_local_experts")
    return attention, 3 * h * i, (h * experts if experts else 0)


def param_count(hf: dict) -> int:
    """Every parameter (the embedding once when tied to the head)."""
    attention, expert, router = _layer_parts(hf)
    per_layer = attention + expert * hf.get("num_local_experts", 1) + router
    embed = hf["vocab_size"] * hf["hidden_size"]
    head = 0 if hf["tie_word_embeddings"] else embed
    return embed + head + hf["num_hidden_layers"] * per_layer + hf["hidden_size"]


def experts_touched(hf: dict, batch: int) -> float:
    """Expected distinct experts a layer runs for `batch` tokens, each picking top-k of E
    (uniform routing, as random weights give): E (1 - (1 - k/E)^batch); 1 for a dense MLP."""
    experts = hf.get("num_local_experts")
    if not experts:
        return 1.0
    return experts * (1 - (1 - hf["num_experts_per_tok"] / experts) ** batch)


def weight_bytes_per_step(hf: dict, batch: int, itemsize: int = 2) -> float:
    """Weight bytes one decode step of `batch` tokens reads: every layer's attention, the
    experts its tokens touch, the head (the embedding rows it gathers are negligible)."""
    attention, expert, router = _layer_parts(hf)
    per_layer = attention + router + expert * experts_touched(hf, batch)
    head = hf["vocab_size"] * hf["hidden_size"]
    return itemsize * (hf["num_hidden_layers"] * per_layer + head + hf["hidden_size"])


def active_layer_params(hf: dict) -> int:
    """Parameters of the layers one token multiplies through (its top-k experts only)."""
    attention, expert, router = _layer_parts(hf)
    return hf["num_hidden_layers"] * (attention + router + expert * hf.get("num_experts_per_tok", 1))


def kv_bytes_per_token(hf: dict, itemsize: int = 2) -> int:
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    return 2 * hf["num_hidden_layers"] * hf["num_key_value_heads"] * head_dim * itemsize


def prefill_flops(hf: dict, prompt_tokens: int) -> float:
    """FLOPs of one prompt's prefill: 2 x active layer parameters x tokens, causal attention,
    the head for the last token only."""
    n, layers, h = prompt_tokens, hf["num_hidden_layers"], hf["hidden_size"]
    attention_flops = layers * 2 * n * n * h   # QK^T and PV, the causal half of 4 n^2 h
    return 2 * active_layer_params(hf) * n + attention_flops + 2 * hf["vocab_size"] * h


def decode_step_seconds(hf: dict, batch: int, context: int, copy_Bps: float, gemm_flops: float) -> float:
    """A bound for one decode step of `batch` tokens, each over `context` tokens of KV, its two
    phases one after the other as the kernels run them: the layers' and the head's matmuls at
    the slower of reading their weights at the copy rate and doing their FLOPs at the GEMM
    rate (FLOPs bound them from a few hundred rows on), then attention reading the KV at the
    copy rate (its FLOPs are a few per byte)."""
    matmul_flops = 2 * batch * (active_layer_params(hf) + hf["vocab_size"] * hf["hidden_size"])
    matmuls = max(weight_bytes_per_step(hf, batch) / copy_Bps, matmul_flops / gemm_flops)
    return matmuls + batch * context * kv_bytes_per_token(hf) / copy_Bps


def offline_seconds(hf: dict, requests: int, running: int, prompt: int, output: int, copy_Bps: float,
                    gemm_flops: float) -> float:
    """A bound for an offline run of `requests` prompts of `prompt` tokens to `output` tokens
    each, at most `running` at once: every prefill at the GEMM rate (prefill_flops), plus
    decode steps (decode_step_seconds), the requests in waves of `running`, each wave's
    output - 1 steps (the first token comes from its prefill) over its KV so far."""
    decode = 0.0
    for first in range(0, requests, running):
        batch = min(running, requests - first)
        decode += sum(decode_step_seconds(hf, batch, prompt + i, copy_Bps, gemm_flops) for i in range(1, output))
    return requests * prefill_flops(hf, prompt) / gemm_flops + decode


def rooflines(hf: dict, batches: list[int], context: int, prompt_lengths: list[int], copy_Bps: float,
              gemm_flops: float) -> dict:
    """Decode step seconds per batch (decode_step_seconds) and prefill seconds of one prompt per
    length (prefill_flops at the GEMM rate)."""
    decode = {b: decode_step_seconds(hf, b, context, copy_Bps, gemm_flops) for b in batches}
    return {"decode_s": decode, "ttft_s": {n: prefill_flops(hf, n) / gemm_flops for n in prompt_lengths},
            "weights_GB": 2 * param_count(hf) / 1e9}
