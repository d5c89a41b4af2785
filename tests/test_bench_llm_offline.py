"""bench.llm's offline run on a tiny NumPy engine: the plans it counts are the scheduler's
(two waves of prefill then 127 decode steps each), its spans cover the run, and the
methods it times are the classes' again afterwards."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.llm import OFFLINE_TOKENS, offline_run  # noqa: E402
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
