"""Scheduler on CPU, driven by a fake model instead of a ModelRunner.

The fake model keeps a toy paged "KV cache" (each slot stores its token id
and position, written through the plan's slot mapping and block copies) and
predicts next token = hash(context read back through the plan's block
table). A wrong slot, table, copy or prefix hit therefore changes the
output, and every run is compared with a direct, scheduler-free reference.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    np.testing.assert_array_equal(plan.sample_rows, [5, 8])
    np.testing.assert_array_equal(plan.sample_request_index, [0, 1])
    np.testing.assert_array_equal(plan.sampling.offsets, [0, 0])
    assert plan.sampling.prompt_ids.shape == (2, 0) and plan.block_copies.shape == (0, 2)
    scheduler.update_from_output(plan, model.execute(plan))
    decode = scheduler.schedule()
    np.testing.assert_array_equal(decode.num_scheduled_tokens, [1, 1])
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


# ---- preemption and policies --------------------------------------------

def test_preemption_by_recompute_gives_the_same_tokens():
    scheduler, model = make_scheduler(num_blocks=6, block_size_tokens=2, enable_prefix_caching=False)
    prompts = {"old": [1, 2, 3], "new": [4, 5, 6]}
    newest = None
    for index, (rid, prompt) in enumerate(prompts.items()):
        newest = make_request(rid, prompt, max_tokens=9, ignore_eos=True, arrival_time=index)
        scheduler.add_request(newest)
    statuses = []
    outputs: dict[str, list[RequestOutput]] = {}
    while scheduler.has_unfinished():
        step(scheduler, model)
        statuses.append(newest.status)
        for out in scheduler.take_outputs():
            outputs.setdefault(out.request_id, []).append(out)
    assert RequestStatus.PREEMPTED in statuses and scheduler.stats()["num_preemptions"] >= 1
    for rid, prompt in prompts.items():
        assert tokens_of(outputs[rid]) == reference_tokens(prompt, SamplingParams(max_tokens=9, ignore_eos=True))


def test_retried_request_resumes_from_its_streamed_tokens():
    prompt = [5, 4, 3, 2, 1]
    expected = reference_tokens(prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    scheduler, model = make_scheduler()
    request = make_request("a", prompt, max_tokens=8, ignore_eos=True)
    request.output_token_ids += expected[:3]
    scheduler.add_request(request)
    assert tokens_of(run_to_end(scheduler, model)["a"]) == expected[3:]


def test_priority_policy_admits_and_keeps_the_lowest_value_first():
    scheduler, model = make_scheduler(max_num_seqs=1, policy="priority")
    scheduler.add_request(make_request("low", [1, 2], max_tokens=2, priority=5, arrival_time=0))
    scheduler.add_request(make_request("high", [3, 4], max_tokens=2, priority=0, arrival_time=1))
    assert scheduler.schedule().request_ids == ("high",)


def test_priority_policy_preempts_the_lowest_priority():
    scheduler, model = make_scheduler(num_blocks=4, block_size_tokens=2, policy="priority",
                                      enable_prefix_caching=False)
    low = make_request("low", [1, 2, 3], max_tokens=5, priority=9, arrival_time=0, ignore_eos=True)
    high = make_request("high", [4, 5, 6], max_tokens=5, priority=1, arrival_time=1, ignore_eos=True)
    scheduler.add_request(low)
    scheduler.add_request(high)
    for _ in range(10):
        step(scheduler, model)
        assert high.status is RequestStatus.RUNNING
        if low.status is RequestStatus.PREEMPTED:
            break
    assert low.status is RequestStatus.PREEMPTED and low.num_preemptions == 1
    outputs = run_to_end(scheduler, model)
    assert outputs["high"][-1].finish_reason == "length"


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


# ---- random workloads ---------------------------------------------------

request_specs = st.lists(st.tuples(
    st.integers(0, 12),                     # arrival step
    st.integers(0, 2), st.integers(0, 16),  # shared stem, length of the stem used
    st.one_of(st.just(0), st.integers(0, 8)),   # own suffix length (0: the whole prompt may be cached)
    st.integers(1, 10),                     # max_tokens
    st.integers(0, 2),                      # priority
    st.one_of(st.none(), st.integers(0, 40)),   # abort step
    st.booleans(),                          # abort while the step is in flight
    st.booleans(),                          # ignore_eos
), min_size=1, max_size=8)


@settings(max_examples=500, deadline=None)
@given(pool_slack_blocks=st.integers(-2, 10), block_size_tokens=st.integers(1, 4), budget=st.integers(1, 32),
       max_num_seqs=st.integers(1, 6), max_model_len=st.integers(8, 40), caching=st.booleans(),
       policy=st.sampled_from(["fcfs", "priority"]), specs=request_specs, seed=st.integers(0, 2**16))
def test_random_workloads_finish_without_leaks_and_match_reference(
        pool_slack_blocks, block_size_tokens, budget, max_num_seqs, max_model_len, caching, policy, specs, seed):
    rng = random.Random(seed)
    stems = [[rng.randrange(1, VOCAB) for _ in range(20)] for _ in range(3)]
    requests = {}
    for index, (arrival, stem, stem_len, own, max_tokens, priority, abort, in_flight, ignore) in enumerate(specs):
        prompt = stems[stem][:stem_len] + [rng.randrange(VOCAB) for _ in range(own)] or [1]
        requests[f"r{index}"] = (arrival, make_request(f"r{index}", prompt, max_tokens, priority, arrival,
                                                       ignore_eos=ignore), abort, in_flight)
    # Sized around the largest request: from too small for it to roomy, mostly too small for all at once.
    largest_tokens = max(r.num_prompt_tokens + r.params.max_tokens - 1 for _, r, _, _ in requests.values())
    num_blocks = max(1, -(-largest_tokens // block_size_tokens) + pool_slack_blocks)
    scheduler, model = make_scheduler(num_blocks, block_size_tokens, budget, max_num_seqs, max_model_len,
                                      policy, caching)
    outputs = simulate(scheduler, model, requests)
    check_workload(scheduler, requests, outputs, num_blocks, max_model_len)


def simulate(scheduler, model, requests, max_steps=5_000) -> dict[str, list[RequestOutput]]:
    outputs: dict[str, list[RequestOutput]] = {}
    findable: set[int] = set()   # the router's view, from KV events alone
    last_arrival = max(arrival for arrival, *_ in requests.values())
    for now in range(max_steps):
        for rid, (arrival, request, abort, in_flight) in requests.items():
            if arrival == now:
                scheduler.add_request(request)
            if abort == now and not in_flight:
                scheduler.abort_request(rid)
        plan = scheduler.schedule()
        scheduler.check_integrity()
        assert plan is not None or not scheduler.has_unfinished(), "requests wait but nothing runs"
        if plan is not None:
            for rid, (_, _, abort, in_flight) in requests.items():
                if abort == now and in_flight:
                    scheduler.abort_request(rid)
            scheduler.update_from_output(plan, model.execute(plan))
            scheduler.check_integrity()
        for out in scheduler.take_outputs():
            outputs.setdefault(out.request_id, []).append(out)
        for event in scheduler.block_manager.take_events():
            (findable.update if event.kind == "stored" else findable.difference_update)(event.block_hashes)
        assert findable == scheduler.block_manager.cached_block_hashes()
        if now >= last_arrival and not scheduler.has_unfinished():
            return outputs
    raise AssertionError("workload did not finish")


def check_workload(scheduler, requests, outputs, num_blocks, max_model_len):
    manager = scheduler.block_manager
    assert manager.num_free_blocks == num_blocks and manager.usage() == 0.0
    for rid, (_, request, abort, _) in requests.items():
        outs = outputs[rid]
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert request.status.is_finished and tokens_of(outs) == request.output_token_ids
        total = request.num_prompt_tokens + request.params.max_tokens
        never_fits = total > max_model_len or manager.num_blocks_for(total - 1) > num_blocks
        if never_fits:
            assert request.status is RequestStatus.FINISHED_ERROR and request.error
            continue
        expected = reference_tokens(request.prompt_token_ids, request.params)
        if request.status is RequestStatus.FINISHED_ABORTED:
            assert expected[:request.num_output_tokens] == request.output_token_ids
        else:
            assert request.output_token_ids == expected
            assert request.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)
