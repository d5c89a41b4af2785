"""build_step_plan's padding, checked directly: tables longer than a row needs
are cut to ceil(seq_len / block) blocks and padded with 0, and penalty
histories are padded per row."""

from __future__ import annotations

import numpy as np

from shardline.worker.plan_builder import build_step_plan
from shardline.worker.request import Request
from shardline.worker.sampling_params import SamplingParams


def test_block_tables_are_cut_to_each_rows_tokens_and_padded():
    a = Request("a", tuple(range(1, 6)), SamplingParams(max_tokens=4, seed=0))
    b = Request("b", (7, 8), SamplingParams(max_tokens=4, seed=1))
    # a computes 5 tokens (2 blocks of the 3 it holds), b 2 tokens (1 block of 2)
    plan = build_step_plan(0, [(a, 5), (b, 2)], [[3, 4, 9], [5, 6]], [], block_size_tokens=4)
    np.testing.assert_array_equal(plan.block_tables, [[3, 4], [5, 0]])
    assert plan.block_tables.dtype == np.int32
    np.testing.assert_array_equal(plan.slot_mapping, [12, 13, 14, 15, 16, 20, 21])
    np.testing.assert_array_equal(plan.token_ids, [1, 2, 3, 4, 5, 7, 8])


def test_penalty_histories_are_padded_per_row():
    a = Request("a", (1, 2, 3), SamplingParams(max_tokens=4, seed=0, presence_penalty=0.5),
                output_token_ids=[9])
    b = Request("b", (4,), SamplingParams(max_tokens=4, seed=1), output_token_ids=[5, 6])
    a.num_computed_tokens, b.num_computed_tokens = 3, 2
    plan = build_step_plan(0, [(a, 1), (b, 1)], [[0], [1]], [], block_size_tokens=4)
    s = plan.sampling
    np.testing.assert_array_equal(s.prompt_ids, [[1, 2, 3], [4, 0, 0]])
    np.testing.assert_array_equal(s.prompt_lens, [3, 1])
    np.testing.assert_array_equal(s.output_ids, [[9, 0], [5, 6]])
    np.testing.assert_array_equal(s.output_lens, [1, 2])
    np.testing.assert_array_equal(s.offsets, [1, 2])
    assert s.prompt_ids.dtype == s.output_ids.dtype == np.int32
