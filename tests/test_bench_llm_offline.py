"""bench.llm's offline run on a tiny NumPy engine: the plans it counts are the scheduler's
(two waves of prefill then 127 decode steps each), its spans cover the run, and the
methods it times are the classes' again afterwards."""

from __future__ import annotations

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
