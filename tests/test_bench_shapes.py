"""The benchmarks' roofline arithmetic (bench/shapes.py) against transformers
models of the same configs, shrunk: parameter counts equal the models' own,
a decode step's weight bytes count exactly the tensors it reads (top-k
experts at batch 1, every expert for a large batch), and the prefill FLOPs
count the layers a token goes through."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.shapes import (LLAMA3_8B, MIXTRAL_8X7B, SHAPES, SMOLLM2_135M,  # noqa: E402
                          active_layer_params, decode_step_seconds, experts_touched, kv_bytes_per_token,
                          offline_seconds, param_count, prefill_flops, rooflines, weight_bytes_per_step)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 8, "num_key_value_heads": 2,
         "vocab_size": 500, "num_hidden_layers": 3}


def hf_params(hf: dict) -> dict[str, int]:
    model = getattr(transformers, hf["architectures"][0])(transformers.AutoConfig.for_model(**hf))
    return {name: p.numel() for name, p in model.named_parameters()}   # tied weights appear once


@pytest.mark.parametrize("base", [LLAMA3_8B, SMOLLM2_135M, MIXTRAL_8X7B], ids=["llama", "tied", "mixtral"])
def test_counts_match_transformers(base):
    hf = {**base, **SMALL}
    params = hf_params(hf)
    assert param_count(hf) == sum(params.values())
    experts = hf.get("num_local_experts", 1)
    # transformers keeps each layer's experts stacked: [experts, ...] tensors under mlp.experts.
    expert_params = sum(n for name, n in params.items() if ".mlp.experts." in name) // experts if experts > 1 else 0
    embed = params["model.embed_tokens.weight"]   # the head's size, tied or not
    layers = sum(n for name, n in params.items() if name.startswith("model.layers."))
    dense = layers - expert_params * experts   # attention, norms, routers
    for batch, touched in [(1, hf.get("num_experts_per_tok", 1)), (10_000, experts)]:
        want = dense + expert_params * touched + embed + params["model.norm.weight"] if experts > 1 else \
            layers + embed + params["model.norm.weight"]
        assert weight_bytes_per_step(hf, batch) == pytest.approx(2 * want, rel=1e-6), batch
    active = dense + expert_params * hf["num_experts_per_tok"] if experts > 1 else layers
    assert active_layer_params(hf) == active


def test_experts_touched_grows_to_all_of_them():
    hf = {**MIXTRAL_8X7B, **SMALL}
    assert experts_touched(hf, 1) == pytest.approx(2.0)
    assert 2.0 < experts_touched(hf, 4) < experts_touched(hf, 16) < 8.0
    assert experts_touched(LLAMA3_8B, 64) == 1.0


def test_rooflines_of_every_shape_are_positive_and_ordered():
    for name, hf in SHAPES.items():
        r = rooflines(hf, [1, 64], 512, [2048, 8190], 3.0e12, 800e12)
        assert 0 < r["decode_s"][1] < r["decode_s"][64], name
        # causal attention grows with the square: more than 4x the time for 4x the tokens
        assert 0 < 4 * r["ttft_s"][2048] < r["ttft_s"][8190] and r["weights_GB"] > 0, name
    assert rooflines(LLAMA3_8B, [1], 512, [2048], 3.0e12, 800e12)["decode_s"][1] == pytest.approx(5.0e-3, rel=0.1)


def test_decode_step_bound_is_the_slower_of_weights_and_flops_then_the_kv():
    """decode_step_seconds: the matmuls at the slower of their weight bytes at the copy rate
    and their FLOPs at the GEMM rate, plus the KV at the copy rate. Llama-3-8B at 3 TB/s
    and 800 TFLOP/s: weights 5.4 ms; FLOPs 2 x 7.5e9 a token, 0.019 ms, so bytes bound a
    step up to ~280 rows and FLOPs from there."""
    copy, gemm = 3.0e12, 800e12
    kv = kv_bytes_per_token(LLAMA3_8B)
    flops_per_token = 2 * (active_layer_params(LLAMA3_8B) + LLAMA3_8B["vocab_size"] * LLAMA3_8B["hidden_size"])
    for batch in (1, 64):
        assert decode_step_seconds(LLAMA3_8B, batch, 512, copy, gemm) == pytest.approx(
            (weight_bytes_per_step(LLAMA3_8B, batch) + batch * 512 * kv) / copy)
    assert decode_step_seconds(LLAMA3_8B, 512, 512, copy, gemm) == pytest.approx(
        512 * flops_per_token / gemm + 512 * 512 * kv / copy)
    assert 250 < weight_bytes_per_step(LLAMA3_8B, 1) / copy / (flops_per_token / gemm) < 310


def test_offline_bound_is_prefills_plus_decode_waves():
    """offline_seconds: the prefills at the GEMM rate plus, per wave of requests, a decode step
    a new token over the wave's KV so far (decode_step_seconds)."""
    copy, gemm = 3.0e12, 800e12
    one = offline_seconds(LLAMA3_8B, 1, 1, 128, 2, copy, gemm)   # one prefill, then one step at 129 tokens
    step = (weight_bytes_per_step(LLAMA3_8B, 1) + 129 * kv_bytes_per_token(LLAMA3_8B)) / copy
    assert one == pytest.approx(prefill_flops(LLAMA3_8B, 128) / gemm + step)
    whole = offline_seconds(LLAMA3_8B, 1024, 512, 128, 128, copy, gemm)
    # ~22.5k tok/s by hand: 2.3 s of prefill + 254 steps of 9.6 ms of FLOPs and ~4.3 ms of KV
    assert whole == pytest.approx(1024 * 128 / 22_500, rel=0.1)
    assert offline_seconds(LLAMA3_8B, 1024, 512, 128, 128, 2 * copy, 2 * gemm) == pytest.approx(whole / 2)
    # Waves of 512 or 1024 are FLOP-bound, so the same; waves of 64 read the weights 16 times as often.
    assert offline_seconds(LLAMA3_8B, 1024, 1024, 128, 128, copy, gemm) == pytest.approx(whole)
    assert offline_seconds(LLAMA3_8B, 1024, 64, 128, 128, copy, gemm) > 2 * whole
    assert offline_seconds(LLAMA3_8B, 1000, 512, 128, 128, copy, gemm) < whole