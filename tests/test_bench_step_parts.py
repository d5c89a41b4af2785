"""bench/step_parts.py on the NumPy backend with a shrunk Llama shape: every part and batch is
reported, the synthetic step reads as many weight bytes as bench/shapes.py's roofline counts
(itself checked against transformers), each part changes what the step computes, and a shape
with experts is refused; the --config settings it shares with bench/decode_ab.py; --timeline's
critical-path shares (CUDA only: here its arithmetic, and that NumPy runs skip it)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from shapes import LLAMA3_8B, MIXTRAL_8X7B, weight_bytes_per_step  # noqa: E402
from decode_ab import Settings  # noqa: E402
from step_parts import PARTS, SyntheticStep, kernel_adds, print_table, run  # noqa: E402

from shardline.kernels.backend import create_backend  # noqa: E402

SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 8, "num_key_value_heads": 2,
         "vocab_size": 500, "num_hidden_layers": 2}


def differs(a, b) -> bool:
    return float(np.linalg.norm(a - b)) > 1e-3 * float(np.linalg.norm(b))


def test_every_part_and_batch_is_reported():
    rows = run(SimpleNamespace(backend="numpy", shape={**LLAMA3_8B, **SMALL}, config=None, batch=[1, 3],
                               context=37, reps=1))
    assert [(r["batch"], r["parts"]) for r in rows] == [(b, "+".join(PARTS[:n])) for b in (1, 3)
                                                       for n in range(1, len(PARTS) + 1)]
    assert all(r["step_ms"] > 0 and r["config"] == "default" for r in rows)


def test_the_step_reads_the_roofline_weights_and_each_part_counts():
    backend = create_backend("numpy", "float32")
    hf = {**LLAMA3_8B, **SMALL}
    step = SyntheticStep(backend, hf, batch=2, context=21, seed=1)
    assert step.weight_bytes == weight_bytes_per_step(hf, 2, itemsize=4)
    logits = {n: step.forward(set(PARTS[:n])) for n in range(1, len(PARTS) + 1)}
    assert all(out.shape == (2, hf["vocab_size"]) and np.isfinite(out).all() for out in logits.values())
    for n in range(2, len(PARTS) + 1):   # each part changes the result
        assert differs(logits[n], logits[n - 1]), PARTS[n - 1]
    for cache in step.k_caches:           # attention reads the cache: other keys, other logits
        cache[:] = np.random.default_rng(2).standard_normal(cache.shape)
    assert differs(step.forward(set(PARTS[:3])), logits[3])


def test_a_shape_with_experts_is_refused():
    with pytest.raises(ValueError, match="dense"):
        SyntheticStep(create_backend("numpy", "float32"), {**MIXTRAL_8X7B, **SMALL}, batch=1, context=8)


def test_settings_apply_in_turn_and_restore_what_they_do_not_name():
    ops = SimpleNamespace(skinny_k_split=None, skinny_blocks_per_sm=0, other=7)
    settings = Settings(ops, ['pinned={"skinny_k_split": 4}', 'looped={"skinny_blocks_per_sm": 3}', "plain={}"])
    assert list(settings.configs) == ["pinned", "looped", "plain"]
    settings.apply("pinned")
    assert (ops.skinny_k_split, ops.skinny_blocks_per_sm) == (4, 0)
    settings.apply("looped")
    assert (ops.skinny_k_split, ops.skinny_blocks_per_sm) == (None, 3)
    settings.apply("plain")
    assert (ops.skinny_k_split, ops.skinny_blocks_per_sm, ops.other) == (None, 0, 7)


def test_kernel_adds_splits_the_span_into_each_kernels_share():
    """Each kernel adds its end minus the latest end before it (nothing when it ends inside an
    earlier one, the idle gap before it when it starts late), so the shares sum to the span."""
    rng = np.random.default_rng(3)
    intervals = [(0.0, 10.0, "a"), (8.0, 15.0, "b"), (12.0, 14.0, "c"), (20.0, 25.0, "a")]
    rows = {r["kernel"]: r for r in kernel_adds(intervals)}
    assert [r["kernel"] for r in kernel_adds(intervals)] == ["a", "b", "c"]   # largest share first
    assert (rows["a"]["calls"], rows["a"]["us"], rows["a"]["adds_us"]) == (2, 15.0, 20.0)
    assert (rows["b"]["calls"], rows["b"]["us"], rows["b"]["adds_us"]) == (1, 7.0, 5.0)
    assert (rows["c"]["calls"], rows["c"]["us"], rows["c"]["adds_us"]) == (1, 2.0, 0.0)
    # random kernels against a brute-force reference: every instant of the span goes to the first
    # kernel (in start order) still running or not yet ended by then
    starts, lengths = rng.uniform(0, 100, 50), rng.uniform(0, 9, 50)
    intervals = [(float(t), float(t + d), f"k{i % 4}") for i, (t, d) in enumerate(zip(starts, lengths))]
    ordered = sorted(intervals)
    step = 0.01
    want: dict[str, float] = {}
    for t in np.arange(ordered[0][0] + step / 2, max(e for _, e, _ in ordered), step):
        name = next(n for _, e, n in ordered if e >= t)
        want[name] = want.get(name, 0.0) + step
    got = {r["kernel"]: r["adds_us"] for r in kernel_adds(intervals)}
    assert set(got) == {f"k{i}" for i in range(4)}
    for name in got:
        assert got[name] == pytest.approx(want.get(name, 0.0), abs=0.05), name
    span = max(e for _, e, _ in intervals) - min(t for t, _, _ in intervals)
    assert sum(got.values()) == pytest.approx(span)


def test_the_timeline_is_cuda_only_and_printed_after_the_parts(capsys):
    rows = run(SimpleNamespace(backend="numpy", shape={**LLAMA3_8B, **SMALL}, config=None, batch=[1],
                               context=9, reps=1, timeline=True))
    assert all(r["parts"] != "timeline" for r in rows) and len(rows) == len(PARTS)
    rows.append({"shape": "llama3-8b", "batch": 1, "parts": "timeline", "config": "default", "span_us": 25.0,
                 "kernels": kernel_adds([(0.0, 10.0, "a"), (8.0, 15.0, "b"), (20.0, 25.0, "a")])})
    print_table(rows)
    out = capsys.readouterr().out
    assert "one replay spans 25.0 us" in out and "| a | 2 | 15.0 | 20.0 | 10.00 |" in out
    assert out.count("| custom | 1 |") == len(PARTS)   # the parts' rows only
