"""The model's shape, parsed once from an HF `config.json`-style dict.

`ModelConfig` is frozen and holds only what the layers need; per-family
parsers (`parse_*`) translate HF's key names. The registry
(`registry.py`) picks the parser and the model class by the config's
`architectures` entry. Nothing here touches weights or arrays.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator


class ModelConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm: Literal["rms", "layer"] = "rms"
    norm_eps: float = 1e-6
    activation: Literal["silu", "gelu_tanh", "gelu"] = "silu"
    position: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    qkv_bias: bool = False          # Qwen2, GPT-2, Llama with attention_bias
    o_bias: bool = False            # GPT-2, Llama with attention_bias
    mlp_bias: bool = False          # GPT-2, Llama with mlp_bias
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    num_experts: int = 0            # MoE only: routed experts per MoE layer
    num_experts_per_token: int = 0
    norm_topk_prob: bool = True     # renormalise the top-k gate weights (Mixtral yes, Qwen2-MoE by config)
    moe_intermediate_size: int = 0  # Qwen2-MoE expert width (Mixtral's experts use intermediate_size)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE shared expert; 0: none
    decoder_sparse_step: int = 1    # layer i is MoE when (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here (dense MLP instead)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.num_experts and not 0 < self.num_experts_per_token <= self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_token}) must be in "
                             f"1..num_local_experts ({self.num_experts})")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step ({self.decoder_sparse_step}) must be at least 1")
        return self

    def is_moe_layer(self, layer: int) -> bool:
        return (self.num_experts > 0 and (layer + 1) % self.decoder_sparse_step == 0
                and layer not in self.mlp_only_layers)

    def mlp_width(self, layer: int) -> int:
        """Intermediate rows summed over the layer's MLPs (every expert and the
        shared one): its MLP parameters are 3 * hidden_size * this."""
        if not self.is_moe_layer(layer):
            return self.intermediate_size
        expert = self.moe_intermediate_size or self.intermediate_size
        return self.num_experts * expert + self.shared_expert_intermediate_size

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _eos_ids(hf: dict[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    # transformers 5 nests theta and scaling in `rope_parameters`; 4.x uses
    # `rope_theta` plus `rope_scaling`.
    params = dict(hf.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or params or None
    if scaling and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    return theta, scaling


def parse_llama(hf: dict[str, Any]) -> ModelConfig:
    """Llama 2/3, Mistral, SmolLM2 and Qwen2 (which adds QKV bias)."""
    num_heads = hf["num_attention_heads"]
    theta, scaling = _rope(hf)
    qwen2 = hf.get("model_type") == "qwen2" or hf["architectures"][0].startswith("Qwen2")
    return ModelConfig(
        architecture=hf["architectures"][0],
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        qkv_bias=qwen2 or bool(hf.get("attention_bias", False)),
        o_bias=not qwen2 and bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window", True) else None,
        num_experts=hf.get("num_local_experts", 0),
        num_experts_per_token=hf.get("num_experts_per_tok", 0) if hf.get("num_local_experts") else 0,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf),
    )


def parse_qwen2_moe(hf: dict[str, Any]) -> ModelConfig:
    """Qwen2-MoE: Qwen2 plus `num_experts` routed experts of width
    `moe_intermediate_size`, a shared expert, and the sparse-layer pattern."""
    dense = parse_llama(hf).model_dump()
    return ModelConfig(**{
        **dense,
        "num_experts": hf["num_experts"],
        "num_experts_per_token": hf["num_experts_per_tok"],
        "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
        "moe_intermediate_size": hf["moe_intermediate_size"],
        "shared_expert_intermediate_size": hf.get("shared_expert_intermediate_size", 0),
        "decoder_sparse_step": hf.get("decoder_sparse_step", 1),
        "mlp_only_layers": tuple(hf.get("mlp_only_layers") or ()),
    })


def parse_gpt2(hf: dict[str, Any]) -> ModelConfig:
    hidden = hf.get("n_embd", hf.get("hidden_size"))
    num_heads = hf.get("n_head", hf.get("num_attention_heads"))
    activation = hf.get("activation_function", "gelu_new")
    return ModelConfig(
        architecture=hf["architectures"][0],
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        intermediate_size=hf.get("n_inner") or 4 * hidden,
        num_layers=hf.get("n_layer", hf.get("num_hidden_layers")),
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=hidden // num_heads,
        norm="layer",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation="gelu" if activation == "gelu" else "gelu_tanh",
        position="learned",
        max_position_embeddings=hf.get("n_positions", 1024),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf),
    )
