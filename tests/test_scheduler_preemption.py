"""Scheduler under pool pressure, on the fake paged model of test_scheduler:
preemption by recompute gives the same tokens, a retried request resumes
from its streamed tokens, the priority policy admits and preempts by
priority; and a hypothesis run of random workloads (arrivals, shared stems,
aborts in flight, pools from too small to roomy) that must finish without
leaks and match the scheduler-free reference."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from shardline.worker.request import RequestStatus
from shardline.worker.sampling_params import SamplingParams
from shardline.worker.scheduler import RequestOutput
from test_scheduler import VOCAB, make_request, make_scheduler, reference_tokens, run_to_end, step, tokens_of


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
