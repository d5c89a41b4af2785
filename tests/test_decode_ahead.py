"""Decode ahead: the next step is planned (and queued) while the current one
is in flight, requests still decoding taking their next token from the
in-flight step's sampled output. On CPU: the scheduler against the fake
paged model of test_scheduler (plans checked row by row, random workloads
with unforeseen EOS, aborts and preemption against the scheduler-free
reference), and the NumPy float64 engine against the same engine without
decode ahead (greedy, seeded sampling, penalties, a pool small enough to
preempt, aborts in flight)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from engine_fixtures import make_engine, random_prompts, save_tiny_llama, tiny_local
from shardline.worker.block_manager import BlockManager
from shardline.worker.engine_config import EngineConfig
from shardline.worker.model_runner import upload_step_inputs
from shardline.worker.sampling_params import SamplingParams
from shardline.worker.scheduler import Scheduler
from shardline.worker.scheduler_config import SchedulerConfig
from test_engine import mixed_workload
from test_scheduler import EOS, FakeModel, make_request, reference_tokens


def ahead_scheduler(num_blocks=64, block_size_tokens=4, max_num_batched_tokens=64, max_num_seqs=8):
    config = SchedulerConfig(max_num_batched_tokens, max_num_seqs, 256, block_size_tokens,
                             max_plans_in_flight=2, decode_ahead=True)
    return Scheduler(config, BlockManager(num_blocks, block_size_tokens)), FakeModel(num_blocks, block_size_tokens)


def run_ahead(scheduler, model, previous=None):
    """Schedules and runs one plan on the fake model, its pending tokens taken from the
    previous plan's sampled tokens; (plan, sampled) or None."""
    plan = scheduler.schedule()
    scheduler.check_integrity()
    if plan is None:
        return None
    pending = plan.token_sources >= 0
    if pending.any():
        filled = plan.token_ids.copy()
        filled[pending] = previous[plan.token_sources[pending]]
        plan = type(plan)(**{**plan.__dict__, "token_ids": filled})
    return plan, model.execute(plan)


def test_ahead_rows_take_the_pending_token_position_and_sample_offset():
    scheduler, model = ahead_scheduler(block_size_tokens=4)
    scheduler.add_request(make_request("a", range(1, 4), max_tokens=5, ignore_eos=True))
    scheduler.add_request(make_request("p", range(1, 5), max_tokens=5, ignore_eos=True, repetition_penalty=1.2))
    first, sampled = run_ahead(scheduler, model)
    second, _ = run_ahead(scheduler, model, sampled)   # while `first` is in flight
    assert second.request_ids == ("a", "p")
    np.testing.assert_array_equal(second.token_sources, [0, 1])
    np.testing.assert_array_equal(second.positions, [3, 4])
    np.testing.assert_array_equal(second.seq_lens, [4, 5])
    np.testing.assert_array_equal(second.sample_rows, [0, 1])
    np.testing.assert_array_equal(second.sampling.offsets, [1, 1])   # the output token after the pending one
    # the pending token's place in the penalty history, filled on the device
    np.testing.assert_array_equal(second.sampling.output_lens, [1, 1])
    assert scheduler.stats()["num_decode_ahead_tokens"] == 2
    with pytest.raises(RuntimeError, match="2 plan\\(s\\) in flight"):
        scheduler.schedule()
    scheduler.update_from_output(first, sampled)


def test_no_ahead_row_for_a_request_whose_pending_token_is_its_last():
    scheduler, model = ahead_scheduler()
    scheduler.add_request(make_request("a", range(1, 4), max_tokens=1, ignore_eos=True))
    scheduler.add_request(make_request("b", range(1, 4), max_tokens=2, ignore_eos=True))
    first, sampled = run_ahead(scheduler, model)
    second, _ = run_ahead(scheduler, model, sampled)
    assert second.request_ids == ("b",)


def test_next_prompt_chunk_goes_ahead_with_its_known_tokens():
    scheduler, model = ahead_scheduler(max_num_batched_tokens=8)
    scheduler.add_request(make_request("a", range(1, 21), max_tokens=2, ignore_eos=True))
    first, sampled = run_ahead(scheduler, model)
    second, _ = run_ahead(scheduler, model, sampled)
    np.testing.assert_array_equal(second.positions, np.arange(8, 16))
    np.testing.assert_array_equal(second.token_ids, np.arange(9, 17))
    np.testing.assert_array_equal(second.token_sources, np.full(8, -1))
    assert second.sample_rows.size == 0


def test_an_id_reused_while_a_stopped_request_still_has_a_step_in_flight():
    """"a" stops on a token nobody could foresee while the plan after it (with its row) is in
    flight; "a" again, a new request, must not take that row's token."""
    scheduler, model = ahead_scheduler()
    prompt, again = [3, 5, 7], [2, 4, 6, 8]
    stop = reference_tokens(prompt, SamplingParams(max_tokens=8, ignore_eos=True))[1]
    scheduler.add_request(make_request("a", prompt, max_tokens=8, ignore_eos=True, stop_token_ids=[stop]))
    in_flight = [run_ahead(scheduler, model)]
    outputs: dict[int, list[int]] = {}
    readded = False
    for _ in range(100):
        while len(in_flight) < 2:
            ran = run_ahead(scheduler, model, in_flight[-1][1] if in_flight else None)
            if ran is None:
                break
            in_flight.append(ran)
        if not in_flight:
            break
        plan, sampled = in_flight.pop(0)
        scheduler.update_from_output(plan, sampled)
        for out in scheduler.take_outputs():
            outputs.setdefault(readded, []).extend(out.new_token_ids)
            if out.finished and not readded:
                assert in_flight, "the stopped request's next step must still be in flight"
                scheduler.add_request(make_request("a", again, max_tokens=5, ignore_eos=True))
                readded = True
        scheduler.check_integrity()
    assert outputs[False][-1] == stop
    assert outputs[True] == reference_tokens(again, SamplingParams(max_tokens=5, ignore_eos=True))


@pytest.mark.parametrize("seed", range(6))
def test_random_workloads_match_the_reference_with_two_plans_in_flight(seed):
    rng = random.Random(seed)
    scheduler, model = ahead_scheduler(num_blocks=rng.choice([12, 24, 64]), max_num_batched_tokens=rng.choice([8, 64]))
    prompts = {f"r{i}": [rng.randrange(1, 16) for _ in range(rng.randrange(1, 30))] for i in range(12)}
    params = {}
    for rid, prompt in prompts.items():
        request = make_request(rid, prompt, max_tokens=rng.randrange(1, 12))
        params[rid] = request.params
        scheduler.add_request(request)
    aborted = set(rng.sample(sorted(prompts), 2))
    outputs: dict[str, list[int]] = {}
    in_flight = []
    for step in range(2000):
        if not scheduler.has_unfinished() and not in_flight:
            break
        while len(in_flight) < 2:
            ran = run_ahead(scheduler, model, in_flight[-1][1] if in_flight else None)
            if ran is None:
                break
            in_flight.append(ran)
        plan, sampled = in_flight.pop(0)
        scheduler.update_from_output(plan, sampled)
        if step == 5:
            for rid in aborted:
                scheduler.abort_request(rid)
        for out in scheduler.take_outputs():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        scheduler.check_integrity()
    assert not scheduler.has_unfinished() and not in_flight
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks
    for rid, prompt in prompts.items():
        want = reference_tokens(prompt, params[rid], frozenset({EOS}))
        got = outputs.get(rid, [])
        assert got == want[:len(got)] if rid in aborted else got == want, rid
    assert scheduler.stats()["num_decode_ahead_tokens"] > 0


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    return tiny_local(save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", seed))


def both_ways(local, prompts, params, **overrides):
    plain = [c.token_ids for c in make_engine(local, decode_ahead=False, **overrides).generate(prompts, params)]
    engine = make_engine(local, decode_ahead=True, **overrides)
    ahead = [c.token_ids for c in engine.generate(prompts, params)]
    engine.block_manager.check_integrity()
    engine.scheduler.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
    return plain, ahead, engine


def test_engine_greedy_mixed_workload_equals_without_decode_ahead(local):
    prompts, params = mixed_workload(np.random.default_rng())
    plain, ahead, engine = both_ways(local, prompts, params)
    assert ahead == plain
    assert engine.stats()["num_decode_ahead_tokens"] > 0


def test_engine_sampling_penalties_and_stop_tokens_equal_without_decode_ahead(local):
    rng = np.random.default_rng()
    prompts = random_prompts(rng, rng.integers(1, 200, 12))
    greedy = make_engine(local).generate(prompts, [SamplingParams(max_tokens=20, temperature=0.0)] * 12)
    params = []
    for i, done in enumerate(greedy):
        kind = i % 3
        if kind == 0:   # stops on a token it will sample mid-way: the step planned after it is dropped
            params.append(SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[done.token_ids[7]]))
        elif kind == 1:
            params.append(SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=40,
                                         seed=int(rng.integers(0, 2**63))))
        else:
            params.append(SamplingParams(max_tokens=16, temperature=0.8, repetition_penalty=1.3,
                                         presence_penalty=0.5, seed=int(rng.integers(0, 2**63))))
    plain, ahead, engine = both_ways(local, prompts, params)
    assert ahead == plain
    assert all(len(plain[i]) <= 8 for i in range(0, 12, 3))


def test_engine_greedy_penalties_see_the_pending_token(local):
    """Greedy with penalties: a random model repeats its argmax unless the token sampled a
    step before (still pending on the host when the next step was planned) is penalised."""
    rng = np.random.default_rng()
    prompts = random_prompts(rng, rng.integers(1, 100, 8))
    params = [SamplingParams(max_tokens=24, temperature=0.0, repetition_penalty=3.0, frequency_penalty=1.5,
                             presence_penalty=1.5)] * 8
    plain, ahead, engine = both_ways(local, prompts, params)
    assert ahead == plain
    assert engine.stats()["num_decode_ahead_tokens"] > 0


def test_penalties_count_the_pending_token(local):
    """The token a step ahead cannot see on the host yet joins its penalty history on the
    device: with it penalised, the runner-up wins."""
    engine = make_engine(local, decode_ahead=True)
    engine.add_request("p", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0, repetition_penalty=100.0))
    engine.scheduler.schedule()                # its first token: in flight
    ahead = engine.scheduler.schedule()        # its second, planned before the first is known
    assert ahead.takes_pending_tokens
    logits = np.zeros((1, engine.local.model.config.vocab_size))
    logits[0, 11], logits[0, 12] = 2.0, 1.0
    inputs = upload_step_inputs(engine.runner.backend, ahead)
    inputs["token_ids"][0] = 11                # the pending token, as the device filled it
    assert engine.runner._sample(logits, ahead, False, inputs).result().sampled_token_ids[0] == 12


def test_engine_small_pool_preempts_and_equals_without_decode_ahead(local):
    rng = np.random.default_rng()
    prompts = random_prompts(rng, rng.integers(20, 120, 16))
    params = [SamplingParams(max_tokens=int(rng.integers(8, 40)), temperature=0.0) for _ in prompts]
    plain, ahead, engine = both_ways(local, prompts, params, num_kv_blocks=14, max_num_batched_tokens=64)
    assert ahead == plain
    assert engine.stats()["num_preemptions"] > 0


def test_engine_abort_with_a_step_in_flight_frees_everything(local):
    rng = np.random.default_rng()
    prompts = random_prompts(rng, [30, 50, 70, 90])
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    want = make_engine(local).generate(prompts, [params] * 4)
    engine = make_engine(local, decode_ahead=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    got: dict[str, list[int]] = {}
    for step in range(200):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        if step == 6:
            assert len(engine._in_flight) == 1   # the next step is queued now
            engine.abort("r1")
    assert got["r1"] == want[1].token_ids[:len(got["r1"])] and len(got["r1"]) < 30
    assert [got[f"r{i}"] for i in (0, 2, 3)] == [want[i].token_ids for i in (0, 2, 3)]
    assert not engine._in_flight
    engine.scheduler.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks


def test_decode_ahead_default_is_on_only_for_single_rank_cuda_engines_of_mixed_groups(local):
    """Unset, the engine decides (CUDA: on; this NumPy engine: off); prefill and decode
    groups get it off, since KV export cannot decode ahead; an explicit value stays."""
    from shardline.coordinator.cluster_config import GroupSpec
    from shardline.worker.rank_main import engine_config_for

    def group_spec(role, engine):
        return GroupSpec(name="g", role=role, tp=1, pp=1, ep=1, devices=[0], engine=engine)
    assert not make_engine(local).decode_ahead and make_engine(local, decode_ahead=True).decode_ahead
    engine = EngineConfig(model="m")
    assert engine.decode_ahead is None
    for role, expected in (("mixed", None), ("prefill", False), ("decode", False)):
        assert engine_config_for(group_spec(role, engine)).decode_ahead is expected
    pinned = engine.model_copy(update={"decode_ahead": True})
    assert engine_config_for(group_spec("prefill", pinned)).decode_ahead is True
    # Prefill groups never decode: no decode graphs captured when they start (leader and followers alike).
    assert engine.cuda_graphs_at_start
    for role, expected in (("mixed", True), ("prefill", False), ("decode", True)):
        assert engine_config_for(group_spec(role, pinned)).cuda_graphs_at_start is expected
