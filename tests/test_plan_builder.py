"""build_step_plan's padding, checked directly: tables longer than a row needs
are cut to ceil(seq_len / block) blocks and padded with 0, and penalty
histories are padded per row; and every field of its plans against a token-by-token
reference on random schedules (chunks of prompts, decode steps with and without
tokens pending from a plan in flight, penalties or none)."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest

from shardline.worker.plan_builder import build_step_plan
from shardline.worker.request import Request
from shardline.worker.sampling_params import SamplingParams
from shardline.worker.step_plan import SamplingBatch, StepPlan


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


def reference_plan(scheduled, tables, block, ahead) -> dict:
    """A plan's fields token by token and row by row, in plain Python."""
    out = {name: [] for name in ("token_ids", "positions", "slot_mapping", "token_sources", "seq_lens",
                                 "sample_rows", "sample_request_index")}
    query_start_loc, sampled = [0], []
    for b, (request, count) in enumerate(scheduled):
        in_flight, row = ahead.get(request.request_id, (0, -1))
        start = request.num_computed_tokens + in_flight
        for position in range(start, start + count):
            out["token_ids"].append(0 if row >= 0 else request.all_token_ids[position])
            out["positions"].append(position)
            out["slot_mapping"].append(tables[b][position // block] * block + position % block)
            out["token_sources"].append(row)
        query_start_loc.append(query_start_loc[-1] + count)
        out["seq_lens"].append(start + count)
        if row >= 0 or start + count == request.num_tokens:
            out["sample_rows"].append(query_start_loc[-1] - 1)
            out["sample_request_index"].append(b)
            sampled.append((request, row >= 0))
    widths = [-(-n // block) for n in out["seq_lens"]]
    out["block_tables"] = [table[:w] + [0] * (max(widths) - w) for table, w in zip(tables, widths)]
    out["query_start_loc"] = query_start_loc
    out["num_scheduled_tokens"] = [count for _, count in scheduled]
    params = [r.params for r, _ in sampled]
    out["sampling"] = {name: [getattr(p, attr) for p in params] for name, attr in (
        ("temperature", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"), ("min_p", "min_p"),
        ("seeds", "seed"), ("repetition_penalty", "repetition_penalty"), ("presence_penalty", "presence_penalty"),
        ("frequency_penalty", "frequency_penalty"), ("num_logprobs", "logprobs"))}
    out["sampling"]["offsets"] = [r.num_output_tokens + pending for r, pending in sampled]
    history = any(p.uses_penalties for p in params)
    prompts = [list(r.prompt_token_ids) if history else [] for r, _ in sampled]
    outputs = [r.output_token_ids + [0] * pending if history else [] for r, pending in sampled]
    for name, rows in (("prompt", prompts), ("output", outputs)):
        width = max(map(len, rows), default=0)
        out["sampling"][f"{name}_ids"] = [row + [0] * (width - len(row)) for row in rows]
        out["sampling"][f"{name}_lens"] = list(map(len, rows))
    return out


DTYPES = {"token_ids": np.int32, "positions": np.int32, "slot_mapping": np.int64, "token_sources": np.int32,
          "seq_lens": np.int32, "sample_rows": np.int32, "sample_request_index": np.int32, "block_tables": np.int32,
          "query_start_loc": np.int32, "num_scheduled_tokens": np.int32, "temperature": np.float32,
          "top_k": np.int32, "top_p": np.float32, "min_p": np.float32, "seeds": np.uint64, "offsets": np.int64,
          "repetition_penalty": np.float32, "presence_penalty": np.float32, "frequency_penalty": np.float32,
          "num_logprobs": np.int32, "prompt_ids": np.int32, "prompt_lens": np.int32, "output_ids": np.int32,
          "output_lens": np.int32}


def random_schedule(rng, block: int, decode_only: bool, with_ahead: bool, penalties: bool):
    """(scheduled, tables, ahead) of 1-9 requests: decode steps (some with their token pending
    from a plan in flight) or prompt chunks and decode steps mixed."""
    scheduled, tables, ahead = [], [], {}
    pending_rows = iter(rng.permutation(20).tolist())
    for b in range(int(rng.integers(1, 10))):
        params = SamplingParams(max_tokens=64, temperature=float(rng.choice([0.0, 0.7])),
                                top_k=int(rng.integers(0, 50)), top_p=float(rng.uniform(0.5, 1.0)),
                                seed=int(rng.integers(0, 2**40)),
                                logprobs=int(rng.integers(0, 3)),
                                presence_penalty=float(rng.choice([0.0, 0.5])) if penalties else 0.0)
        request = Request(f"r{b}", tuple(rng.integers(0, 1000, int(rng.integers(1, 60))).tolist()), params,
                          output_token_ids=rng.integers(0, 1000, int(rng.integers(0, 8))).tolist())
        if with_ahead and rng.random() < 0.5:   # its last known token computed in the plan in flight
            request.num_computed_tokens = request.num_tokens - 1
            ahead[request.request_id] = (1, next(pending_rows))
            count = 1
        elif decode_only:
            request.num_computed_tokens = request.num_tokens - 1
            count = 1
        else:
            request.num_computed_tokens = int(rng.integers(0, request.num_tokens))
            count = int(rng.integers(1, request.num_tokens - request.num_computed_tokens + 1))
        end = request.num_computed_tokens + ahead.get(request.request_id, (0, -1))[0] + count
        tables.append(rng.integers(0, 500, -(-end // block) + int(rng.integers(0, 3))).tolist())
        scheduled.append((request, count))
    return scheduled, tables, ahead


@pytest.mark.parametrize("decode_only", [False, True])
@pytest.mark.parametrize("with_ahead", [False, True])
@pytest.mark.parametrize("penalties", [False, True])
def test_plans_match_a_token_by_token_reference(decode_only, with_ahead, penalties):
    seed = int(np.random.SeedSequence().entropy % 2**63)
    print(f"random seed {seed}")
    rng = np.random.default_rng(seed)
    for _ in range(40):
        block = int(rng.choice([1, 4, 16]))
        scheduled, tables, ahead = random_schedule(rng, block, decode_only, with_ahead, penalties)
        plan = build_step_plan(3, scheduled, tables, [(1, 2)], block, ahead)
        want = reference_plan(scheduled, tables, block, ahead)
        assert plan.request_ids == tuple(r.request_id for r, _ in scheduled)
        np.testing.assert_array_equal(plan.block_copies, [[1, 2]])
        got = {f.name: getattr(plan, f.name) for f in fields(StepPlan)}
        got.update((f.name, getattr(plan.sampling, f.name)) for f in fields(SamplingBatch))
        for name, dtype in DTYPES.items():
            expected = want["sampling"][name] if name in want["sampling"] else want[name]
            assert got[name].dtype == dtype, name
            np.testing.assert_array_equal(got[name], np.array(expected, dtype=dtype).reshape(got[name].shape),
                                          err_msg=name)
            assert got[name].size == np.size(expected), name
