"""Scheduler on CPU, driven by a fake model instead of a ModelRunner.

The fake model keeps a toy paged "KV cache" (each slot stores its token id
and position, written through the plan's slot mapping and block copies) and
predicts next token = hash(context read back through the plan's block
table). A wrong slot, table, copy or prefix hit therefore changes the
output, and every run is compared with a direct, scheduler-free reference.

Here: step plans array by array, finishing (EOS, stop, abort, requests that
never fit), prefix reuse and validation. Preemption, policies and random
workloads are in test_scheduler_preemption.py, which imports these helpers.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from shardline.worker.block_manager import BlockManager
from shardline.worker.request import Request, RequestStatus
from shardline.worker.sampling_params import SamplingParams
from shardline.worker.scheduler import RequestOutput, Scheduler
from shardline.worker.scheduler_config import SchedulerConfig
from shardline.worker.step_plan import StepPlan

VOCAB = 16
EOS = 0


def next_token(history) -> int:
    digest = hashlib.blake2b(np.asarray(history, dtype=np.int32).tobytes(), digest_size=4).digest()
    return int.from_bytes(digest, "little") % VOCAB


def reference_tokens(prompt, params: SamplingParams, eos=frozenset({EOS})) -> list[int]:
    history, out = list(prompt), []
    while True:
        token = next_token(history)
        out.append(token)
        history.append(token)
        if (token in params.stop_token_ids or (token in eos and not params.ignore_eos)
                or len(out) >= params.max_tokens):
            return out


class FakeModel:
    def __init__(self, num_blocks: int, block_size_tokens: int):
        self.block_size_tokens = block_size_tokens
        self.tokens = np.zeros(num_blocks * block_size_tokens, dtype=np.int64)
        self.positions = np.zeros(num_blocks * block_size_tokens, dtype=np.int64)
        self.written = np.zeros(num_blocks * block_size_tokens, dtype=bool)

    def execute(self, plan: StepPlan) -> np.ndarray:
        bs = self.block_size_tokens
        for src, dst in plan.block_copies:
            for store in (self.tokens, self.positions, self.written):
                store[dst * bs:(dst + 1) * bs] = store[src * bs:(src + 1) * bs]
        self.tokens[plan.slot_mapping] = plan.token_ids
        self.positions[plan.slot_mapping] = plan.positions
        self.written[plan.slot_mapping] = True
        sampled = []
        for row, index in zip(plan.sample_rows, plan.sample_request_index):
            assert plan.query_start_loc[index] <= row < plan.query_start_loc[index + 1]
            position = np.arange(plan.seq_lens[index])
            slots = plan.block_tables[index, position // bs].astype(np.int64) * bs + position % bs
            assert self.written[slots].all()
            np.testing.assert_array_equal(self.positions[slots], position)
            sampled.append(next_token(self.tokens[slots]))
        return np.asarray(sampled, dtype=np.int32)


def make_scheduler(num_blocks=64, block_size_tokens=4, max_num_batched_tokens=64, max_num_seqs=8,
                   max_model_len=256, policy="fcfs", enable_prefix_caching=True):
    config = SchedulerConfig(max_num_batched_tokens, max_num_seqs, max_model_len, block_size_tokens, policy)
    manager = BlockManager(num_blocks, block_size_tokens, enable_prefix_caching)
    return Scheduler(config, manager), FakeModel(num_blocks, block_size_tokens)


def make_request(request_id, prompt, max_tokens=8, priority=0, arrival_time=0.0, **params) -> Request:
    return Request(request_id, tuple(prompt), SamplingParams(max_tokens=max_tokens, seed=7, **params),
                   arrival_time=arrival_time, priority=priority, eos_token_ids=frozenset({EOS}))


def step(scheduler: Scheduler, model: FakeModel) -> StepPlan | None:
    plan = scheduler.schedule()
    scheduler.check_integrity()
    if plan is not None:
        scheduler.update_from_output(plan, model.execute(plan))
        scheduler.check_integrity()
    return plan


def run_to_end(scheduler, model, max_steps=10_000) -> dict[str, list[RequestOutput]]:
    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            break
        assert step(scheduler, model) is not None, "unfinished requests but nothing scheduled"
        for out in scheduler.take_outputs():
            outputs.setdefault(out.request_id, []).append(out)
    assert not scheduler.has_unfinished()
    return outputs


def tokens_of(outputs: list[RequestOutput]) -> list[int]:
    return [t for out in outputs for t in out.new_token_ids]


# ---- plans --------------------------------------------------------------

def test_prefill_then_decode_plan_arrays():
    scheduler, model = make_scheduler(block_size_tokens=4)
    scheduler.add_request(make_request("a", range(10, 16), max_tokens=3, ignore_eos=True))
    scheduler.add_request(make_request("b", range(20, 23), max_tokens=3, ignore_eos=True))
    plan = scheduler.schedule()
    assert plan.request_ids == ("a", "b")
    np.testing.assert_array_equal(plan.num_scheduled_tokens, [6, 3])
    np.testing.assert_array_equal(plan.query_start_loc, [0, 6, 9])
    np.testing.assert_array_equal(plan.token_ids, [10, 11, 12, 13, 14, 15, 20, 21, 22])
    np.testing.assert_array_equal(plan.positions, [0, 1, 2, 3, 4, 5, 0, 1, 2])
    np.testing.assert_array_equal(plan.block_tables, [[0, 1], [2, 0]])
    np.testing.assert_array_equal(plan.slot_mapping, [0, 1, 2, 3, 4, 5, 8, 9, 10])
    np.testing.assert_array_equal(plan.seq_lens, [6, 3])
    assert not plan.one_query_each
    np.testing.assert_array_equal(plan.sample_rows, [5, 8])
    np.testing.assert_array_equal(plan.sample_request_index, [0, 1])
    np.testing.assert_array_equal(plan.sampling.offsets, [0, 0])
    assert plan.sampling.prompt_ids.shape == (2, 0) and plan.block_copies.shape == (0, 2)
    scheduler.update_from_output(plan, model.execute(plan))
    decode = scheduler.schedule()
    np.testing.assert_array_equal(decode.num_scheduled_tokens, [1, 1])
    assert decode.one_query_each   # query_start_loc 0, 1, 2: the flash kernel skips its tile lookup
    np.testing.assert_array_equal(decode.query_start_loc, [0, 1, 2])
    np.testing.assert_array_equal(decode.positions, [6, 3])
    np.testing.assert_array_equal(decode.sampling.offsets, [1, 1])
    np.testing.assert_array_equal(decode.slot_mapping, [6, 11])


def test_chunked_prefill_samples_only_at_the_end_of_the_prompt():
    scheduler, model = make_scheduler(max_num_batched_tokens=4)
    scheduler.add_request(make_request("a", range(1, 11), max_tokens=2, ignore_eos=True))
    counts, samples = [], []
    while scheduler.has_unfinished():
        plan = step(scheduler, model)
        counts.append(plan.num_scheduled_tokens.tolist())
        samples.append(plan.sample_rows.tolist())
    assert counts == [[4], [4], [2], [1]]
    assert samples == [[], [], [1], [0]]


def test_budget_and_sequence_cap_are_respected():
    scheduler, model = make_scheduler(max_num_batched_tokens=5, max_num_seqs=2)
    for index in range(4):
        scheduler.add_request(make_request(f"r{index}", range(1, 4), max_tokens=3, ignore_eos=True))
    while scheduler.has_unfinished():
        plan = step(scheduler, model)
        assert plan.num_tokens <= 5 and len(plan.request_ids) <= 2


def test_penalty_history_only_when_a_row_uses_penalties():
    scheduler, model = make_scheduler()
    scheduler.add_request(make_request("a", [5, 6, 7], max_tokens=4, ignore_eos=True))
    scheduler.add_request(make_request("b", [8, 9], max_tokens=4, ignore_eos=True, repetition_penalty=1.3,
                                       min_p=0.1, logprobs=3))
    step(scheduler, model)
    plan = scheduler.schedule()
    s = plan.sampling
    np.testing.assert_array_equal(s.prompt_ids, [[5, 6, 7], [8, 9, 0]])
    np.testing.assert_array_equal(s.prompt_lens, [3, 2])
    assert s.output_ids.shape == (2, 1) and s.output_lens.tolist() == [1, 1]
    np.testing.assert_allclose(s.repetition_penalty, [1.0, 1.3])
    np.testing.assert_allclose(s.min_p, [0.0, 0.1])
    assert s.num_logprobs.tolist() == [0, 3] and s.seeds.dtype == np.uint64


def test_step_plan_round_trips_through_bytes():
    scheduler, model = make_scheduler(block_size_tokens=2)
    scheduler.add_request(make_request("a", range(1, 9), max_tokens=3, ignore_eos=True, presence_penalty=0.5))
    step(scheduler, model)
    scheduler.add_request(make_request("b", range(1, 9), max_tokens=3, ignore_eos=True))   # whole prompt cached: a copy
    plan = scheduler.schedule()
    assert plan.block_copies.shape == (1, 2)
    back = StepPlan.from_bytes(plan.to_bytes())
    assert back.step_id == plan.step_id and back.request_ids == plan.request_ids
    for name in ("token_ids", "positions", "slot_mapping", "block_tables", "block_copies", "sample_rows"):
        np.testing.assert_array_equal(getattr(back, name), getattr(plan, name))
        assert getattr(back, name).dtype == getattr(plan, name).dtype
    np.testing.assert_array_equal(back.sampling.output_ids, plan.sampling.output_ids)
    assert back.sampling.seeds.dtype == np.uint64


def test_schedule_twice_without_update_is_refused():
    scheduler, _ = make_scheduler()
    scheduler.add_request(make_request("a", [1, 2]))
    scheduler.schedule()
    with pytest.raises(RuntimeError, match="in flight"):
        scheduler.schedule()


# ---- finishing ----------------------------------------------------------

def test_outputs_match_reference_and_stream_one_token_a_step():
    scheduler, model = make_scheduler()
    prompts = {"a": [3, 1, 4, 1, 5], "b": [9, 2, 6], "c": list(range(30, 50))}
    for rid, prompt in prompts.items():
        scheduler.add_request(make_request(rid, prompt, max_tokens=12))
    outputs = run_to_end(scheduler, model)
    for rid, prompt in prompts.items():
        assert tokens_of(outputs[rid]) == reference_tokens(prompt, SamplingParams(max_tokens=12))
        assert all(len(out.new_token_ids) == 1 for out in outputs[rid])
        assert [out.finished for out in outputs[rid]] == [False] * (len(outputs[rid]) - 1) + [True]
        assert outputs[rid][-1].num_prompt_tokens == len(prompt)
    assert scheduler.block_manager.num_free_blocks == 64


def first_prompt_with(predicate) -> list[int]:
    return next([i, i + 1] for i in range(1, 10_000) if predicate(next_token([i, i + 1])))


def test_eos_stop_token_and_length():
    eos_prompt = first_prompt_with(lambda t: t == EOS)
    scheduler, model = make_scheduler()
    scheduler.add_request(make_request("eos", eos_prompt, max_tokens=5))
    scheduler.add_request(make_request("ignore", eos_prompt, max_tokens=5, ignore_eos=True))
    stop_prompt = first_prompt_with(lambda t: t == 13)
    scheduler.add_request(make_request("stop", stop_prompt, max_tokens=5, stop_token_ids=(13,)))
    outputs = run_to_end(scheduler, model)
    final = {rid: outs[-1] for rid, outs in outputs.items()}
    assert tokens_of(outputs["eos"]) == [EOS] and final["eos"].finish_reason == "stop"
    assert len(tokens_of(outputs["ignore"])) == 5 and final["ignore"].finish_reason == "length"
    assert final["ignore"].status is RequestStatus.FINISHED_LENGTH
    assert final["stop"].finish_reason == "stop" and final["stop"].stop_reason == 13


def test_finish_request_for_a_stop_string():
    scheduler, model = make_scheduler()
    scheduler.add_request(make_request("a", [1, 2, 3], max_tokens=50, ignore_eos=True))
    step(scheduler, model)
    assert len(scheduler.take_outputs()) == 1
    assert scheduler.finish_request("a", RequestStatus.FINISHED_STOPPED, "\n\n")
    (out,) = scheduler.take_outputs()
    assert (out.finished, out.finish_reason, out.stop_reason, out.new_token_ids) == (True, "stop", "\n\n", ())
    assert not scheduler.has_unfinished() and scheduler.block_manager.usage() == 0.0
    assert not scheduler.finish_request("a", RequestStatus.FINISHED_STOPPED)


def test_abort_waiting_running_and_in_flight():
    scheduler, model = make_scheduler(max_num_seqs=1)
    for rid in ("running", "waiting", "in-flight"):
        scheduler.add_request(make_request(rid, [1, 2, 3], max_tokens=20, ignore_eos=True))
    step(scheduler, model)
    assert scheduler.abort_request("waiting") and scheduler.abort_request("running")
    assert not scheduler.abort_request("running") and not scheduler.abort_request("nobody")
    plan = scheduler.schedule()
    assert plan.request_ids == ("in-flight",)
    assert scheduler.abort_request("in-flight")
    scheduler.update_from_output(plan, model.execute(plan))   # the late token is dropped
    scheduler.check_integrity()
    finals = [o for o in scheduler.take_outputs() if o.finished]
    assert [(o.request_id, o.finish_reason) for o in finals] == [
        ("waiting", "abort"), ("running", "abort"), ("in-flight", "abort")]
    assert scheduler.block_manager.num_free_blocks == 64 and scheduler.schedule() is None


def test_request_that_never_fits_fails_at_once_with_the_numbers():
    scheduler, _ = make_scheduler(num_blocks=4, block_size_tokens=4, max_model_len=100)
    scheduler.add_request(make_request("pool", range(1, 15), max_tokens=4))     # 17 KV tokens, 5 blocks
    scheduler.add_request(make_request("len", range(1, 90), max_tokens=20))
    scheduler.add_request(make_request("ok", range(1, 14), max_tokens=4))       # 16 KV tokens: fits exactly
    outs = {o.request_id: o for o in scheduler.take_outputs()}
    assert outs["pool"].status is RequestStatus.FINISHED_ERROR and outs["pool"].finish_reason == "error"
    assert outs["pool"].error.startswith("max_tokens") and "5 KV blocks" in outs["pool"].error
    assert "holds only 4" in outs["pool"].error
    assert "109" in outs["len"].error and "max_model_len (100)" in outs["len"].error
    assert "ok" not in outs and scheduler.has_unfinished()


def test_duplicate_request_id_is_refused():
    scheduler, _ = make_scheduler()
    scheduler.add_request(make_request("a", [1]))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(make_request("a", [2]))


# ---- prefix reuse -------------------------------------------------------

def test_shared_1024_token_prefix_is_reused():
    scheduler, model = make_scheduler(num_blocks=200, block_size_tokens=16, max_num_batched_tokens=2048,
                                      max_model_len=4096)
    prefix = [(7 * i) % 50 + 1 for i in range(1024)]
    scheduler.add_request(make_request("first", prefix + [60, 61], max_tokens=2))
    run_to_end(scheduler, model)
    suffix = [62, 63, 1, 2, 3]
    scheduler.add_request(make_request("second", prefix + suffix, max_tokens=2))
    plan = scheduler.schedule()
    assert plan.num_scheduled_tokens.tolist() == [len(suffix)]
    np.testing.assert_array_equal(plan.token_ids, suffix)
    np.testing.assert_array_equal(plan.positions, range(1024, 1029))
    scheduler.update_from_output(plan, model.execute(plan))
    outputs = run_to_end(scheduler, model)
    assert outputs["second"][0].num_cached_tokens == 1024
    assert tokens_of(outputs["second"]) == reference_tokens(prefix + suffix, SamplingParams(max_tokens=2))
    assert scheduler.stats()["prefix_hit_tokens"] == 1024


def test_engine_core_imports_no_gpu_or_model_code():
    code = ("import sys, shardline.worker.scheduler, shardline.worker.block_manager; "
            "bad = [m for m in sys.modules if m.startswith(('cupy', 'shardline.kernels', 'shardline.models'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- validation ---------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("min_p", 1.5), ("min_p", -0.1), ("repetition_penalty", 0.0), ("presence_penalty", 2.5),
    ("frequency_penalty", -3.0), ("stop", ("",)), ("stop_token_ids", (-1,)), ("logprobs", 21),
    ("logprobs", -1)])
def test_sampling_params_reject_new_bad_values_by_name(field, value):
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**{field: value})


def test_sampling_params_normalise_stop_lists():
    params = SamplingParams(stop="###", stop_token_ids=[3, 4])
    assert params.stop == ("###",) and params.stop_token_ids == (3, 4)
    assert not params.uses_penalties and SamplingParams(frequency_penalty=0.1).uses_penalties


def test_config_and_request_validation():
    with pytest.raises(ValueError, match="^max_num_seqs"):
        SchedulerConfig(8, 0, 8, 4)
    with pytest.raises(ValueError, match="^policy"):
        SchedulerConfig(8, 1, 8, 4, "lifo")
    with pytest.raises(ValueError, match="^prompt_token_ids"):
        Request("a", (), SamplingParams())
    request = make_request("a", [1, 2, 3])
    request.output_token_ids += [4, 5]
    assert request.tokens(1, 4) == [2, 3, 4] and request.tokens(3, 5) == [4, 5] and request.num_tokens == 5
    assert RequestStatus.FINISHED_ABORTED.is_finished and not RequestStatus.PREEMPTED.is_finished
