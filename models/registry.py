"""Maps the HF `architectures` name to a config parser and a model class.

Adding an architecture is one line here plus its model file. An unknown
name fails with the list of known ones.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from shardline.models.config import ModelConfig, parse_gpt2, parse_llama, parse_qwen2_moe
from shardline.models.errors import UnknownArchitectureError
from shardline.models.gpt2 import GPT2LMHeadModel
from shardline.models.llama import LlamaForCausalLM
from shardline.models.mixtral import MixtralForCausalLM
from shardline.models.qwen2_moe import Qwen2MoeForCausalLM


class Architecture(NamedTuple):
    parse: Callable[[dict[str, Any]], ModelConfig]
    model_class: type


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture(parse_llama, LlamaForCausalLM),
    "MistralForCausalLM": Architecture(parse_llama, LlamaForCausalLM),
    "Qwen2ForCausalLM": Architecture(parse_llama, LlamaForCausalLM),
    "MixtralForCausalLM": Architecture(parse_llama, MixtralForCausalLM),
    "Qwen2MoeForCausalLM": Architecture(parse_qwen2_moe, Qwen2MoeForCausalLM),
    "GPT2LMHeadModel": Architecture(parse_gpt2, GPT2LMHeadModel),
}


def lookup(hf_config: dict[str, Any], source: Any) -> Architecture:
    names = hf_config.get("architectures") or []
    if not names:
        raise UnknownArchitectureError(source, "config has no 'architectures' entry; known: "
                                       + ", ".join(ARCHITECTURES))
    if names[0] not in ARCHITECTURES:
        raise UnknownArchitectureError(source, f"architecture {names[0]!r} is not supported; known: "
                                       + ", ".join(ARCHITECTURES))
    return ARCHITECTURES[names[0]]
