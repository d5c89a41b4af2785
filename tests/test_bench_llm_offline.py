"""bench.llm's offline run on a tiny NumPy engine: the plans it counts are the scheduler's
(two waves of prefill then 127 decode steps each), its spans cover the run, and the
methods it times are the classes' again afterwards."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.llm import OFFLINE_TOKENS, SAMPLED, decode_step_s, offline_run  # noqa: E402
from engine_fixtures import make_engine, save_tiny_llama, tiny_local  # noqa: E402


def test_offline_run_counts_plans_and_splits_their_time(tmp_path):
    local = tiny_local(save_tiny_llama(tmp_path / "tiny", seed=3), dtype="float32")
    running = 4
    engine = make_engine(local, num_kv_blocks=64, max_num_batched_tokens=running * OFFLINE_TOKENS,
                         max_num_seqs=running)
    report = offline_run(engine, 2 * running, np.random.default_rng(0))
    # Each wave: one plan of its 4 prompts (their first tokens), then 127 decode-only plans of 4 rows.
    assert report["offline_plans"] == 2 * OFFLINE_TOKENS
    assert report["offline_prompt_plans"] == 2
    assert report["offline_decode_rows_mean"] == running
    spans = report["offline_prompt_plans_s"] + report["offline_decode_plans_s"]
    assert 0 < report["offline_prompt_plans_s"] and 0 < spans <= report["offline_s"]
    assert report["offline_tokens_per_s"] == pytest.approx(2 * running * OFFLINE_TOKENS / report["offline_s"])
    host = report["offline_host_s"]
    assert set(host) == {"schedule", "update_from_output", "_stream", "runner_launch"}
    assert all(seconds > 0 for seconds in host.values())
    assert not {"schedule", "update_from_output"} & set(vars(engine.scheduler))   # the class's methods again
    assert "_stream" not in vars(engine) and "launch" not in vars(engine.runner)
    assert not engine.has_unfinished()


def test_decode_step_times_steps_of_the_whole_batch(tmp_path):
    """Prefilling the batch takes a plan a request, while the first requests decode: every
    timed step still decodes all of them."""
    local = tiny_local(save_tiny_llama(tmp_path / "tiny", seed=4), dtype="float32")
    batch, context, steps = 8, 32, 6
    engine = make_engine(local, num_kv_blocks=64, max_num_batched_tokens=context, max_num_seqs=batch)
    rows: list[int] = []
    update = engine.scheduler.update_from_output

    def update_and_count(plan, sampled):
        rows.append(len(plan.request_ids))
        update(plan, sampled)
    engine.scheduler.update_from_output = update_and_count
    assert decode_step_s(engine, batch, context, steps, np.random.default_rng(1)) > 0
    assert rows[:batch] == list(range(1, batch + 1))   # a prompt a plan, the ones before decoding
    assert rows[-steps:] == [batch] * steps            # the timed steps (none after the aborts)
    assert not engine.has_unfinished()
    rows.clear()   # sampled as bench.llm's sampled row asks: the same plans
    assert decode_step_s(engine, batch, context, steps, np.random.default_rng(2), SAMPLED) > 0
    assert rows[-steps:] == [batch] * steps and not engine.has_unfinished()

    inside: list[int] = []   # `around` (step_profile's profiler) holds the timed steps, and only them

    @contextlib.contextmanager
    def around():
        inside.append(len(rows))
        yield
        inside.append(len(rows))
    rows.clear()
    decode_step_s(engine, batch, context, steps, np.random.default_rng(3), around=around)
    assert inside[1] - inside[0] == steps and inside[1] == len(rows) and rows[-steps:] == [batch] * steps


def test_ttft_lengths_fit_the_shape_and_the_table_rates_them(capsys):
    """The TTFT lengths are cut to the shape's positions less what mixed_ttft's request asks
    for; the table gives each length's TTFT and prefill rate with their roofline ratios."""
    from bench.kv_transfer import TTFT_MAX_TOKENS
    from bench.llm import print_table, ttft_lengths
    from bench.shapes import LLAMA3_8B
    assert ttft_lengths(LLAMA3_8B, [8192, 2048, 2048]) == [2048, 8192 - TTFT_MAX_TOKENS]
    ours = {"ceilings": {"copy_GBps": 4000.0, "gemm_TFLOPs": 800.0}, "decode_eager_s_batch1": 0.01,
            "decode_s": {1: 0.004}, "ttft_s": {2048: 0.05, 8190: 0.25}, "offline_tokens_per_s": 16000.0,
            "kv_cache_bytes": 1e9, "peak_device_bytes": 2e9}
    roof = {"decode_s": {1: 0.0035}, "ttft_s": {2048: 0.04, 8190: 0.2}, "weights_GB": 16.0}
    print_table({"device": "GPU", "context": 512, "ttft_tokens": [2048, 8192], "offline_requests": 8,
                 "shapes": {"llama3-8b": {"ours": ours, "roofline": roof, "hf": {"ttft_s": {2048: 0.1, 8190: 0.5}}}}})
    lines = capsys.readouterr().out.splitlines()
    assert "| llama3-8b | TTFT, 8190 tokens (ms) | 250.00 | 500.00 | 200.00 | 1.25 | 2.00 |" in lines
    assert "| llama3-8b | prefill, 2048 tokens (prompt tok/s) | 40960 | 20480 | 51200 | 1.25 | 2.00 |" in lines
