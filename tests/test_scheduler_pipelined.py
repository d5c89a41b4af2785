"""Several plans in flight (pipeline micro-batches): a request is in one
plan at most, results must come back oldest first, preemption never takes
a request whose plan is in flight, and every request still ends with the
same tokens as when run alone — under random load, with pools too small."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardline.worker.block_manager import BlockManager
from shardline.worker.scheduler import Scheduler
from shardline.worker.scheduler_config import SchedulerConfig
from test_scheduler import FakeModel, make_request, reference_tokens, tokens_of


def pipelined(num_blocks: int, plans_in_flight: int, budget: int = 24):
    config = SchedulerConfig(budget, 8, 256, 4, max_plans_in_flight=plans_in_flight)
    return Scheduler(config, BlockManager(num_blocks, 4)), FakeModel(num_blocks, 4)


def run_pipelined(scheduler: Scheduler, model: FakeModel, depth: int, max_steps: int = 5000):
    """Keep up to `depth` plans in flight; the fake model runs each plan when
    it is submitted (stages run plans in order), tokens return oldest first."""
    in_flight, outputs = deque(), {}
    for _ in range(max_steps):
        while len(in_flight) < depth:
            plan = scheduler.schedule()
            if plan is None:
                break
            in_flight.append((plan, model.execute(plan)))
            scheduler.check_integrity()
        if not in_flight:
            break
        plan, tokens = in_flight.popleft()
        scheduler.update_from_output(plan, tokens)
        scheduler.check_integrity()
        for out in scheduler.take_outputs():
            outputs.setdefault(out.request_id, []).append(out)
    assert not scheduler.has_unfinished() and not in_flight
    return outputs


def test_two_plans_never_share_a_request_and_return_in_order():
    scheduler, model = pipelined(num_blocks=64, plans_in_flight=2, budget=12)
    for i in range(4):
        scheduler.add_request(make_request(f"r{i}", [i + 1] * 6, max_tokens=5))
    first, second = scheduler.schedule(), scheduler.schedule()  # 12-token budget: two prompts each
    assert set(first.request_ids) == {"r0", "r1"} and set(second.request_ids) == {"r2", "r3"}
    with pytest.raises(RuntimeError, match="in flight"):
        scheduler.schedule()
    with pytest.raises(ValueError, match="oldest"):
        scheduler.update_from_output(second, model.execute(second))
    scheduler.update_from_output(first, model.execute(first))
    third = scheduler.schedule()   # r0, r1 decode again; r2, r3 are still in the pipe
    assert set(third.request_ids) == {"r0", "r1"}


@settings(max_examples=40, deadline=None)
@given(depth=st.integers(2, 3), num_blocks=st.integers(12, 40),
       prompts=st.lists(st.lists(st.integers(3, 90), min_size=1, max_size=30), min_size=1, max_size=8),
       max_tokens=st.lists(st.integers(1, 12), min_size=8, max_size=8))
def test_pipelined_runs_match_reference(depth, num_blocks, prompts, max_tokens):
    scheduler, model = pipelined(num_blocks, depth)
    requests = [make_request(f"r{i}", p, max_tokens=m) for i, (p, m) in enumerate(zip(prompts, max_tokens))]
    for request in requests:
        scheduler.add_request(request)
    outputs = run_pipelined(scheduler, model, depth)
    for request in requests:
        got = outputs[request.request_id]
        if got[-1].finish_reason == "error":  # can never fit in this pool
            continue
        assert tokens_of(got) == reference_tokens(list(request.prompt_token_ids), request.params)
    assert scheduler.block_manager.num_free_blocks == num_blocks
