"""Engine core end to end on the NumPy backend: in-flight batching equals
one-at-a-time, prefix reuse computes only the suffix, a too-small pool
still finishes everything identically, seeded sampling ignores batch
composition, aborts free their blocks."""

from __future__ import annotations

import numpy as np
import pytest

from engine_fixtures import make_engine, random_prompts, save_tiny_llama, tiny_local
from shardline.worker.request import Request
from shardline.worker.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    return tiny_local(save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", seed))


def run_alone(local, prompts, params):
    return [make_engine(local).generate([p], [q])[0].token_ids for p, q in zip(prompts, params)]


def mixed_workload(rng, count=32):
    lengths = [1, 1500, 2, 700, 17, 1023, 64, 333] + rng.integers(1, 1500, count - 8).tolist()
    params = [SamplingParams(max_tokens=int(rng.integers(1, 24)), temperature=0.0) for _ in range(count)]
    return random_prompts(rng, lengths), params


def test_batched_equals_sequential(local):
    rng = np.random.default_rng()
    prompts, params = mixed_workload(rng)
    engine = make_engine(local)
    batched = engine.generate(prompts, params)
    assert [c.token_ids for c in batched] == run_alone(local, prompts, params)
    assert all(len(c.token_ids) == p.max_tokens for c, p in zip(batched, params))
    engine.block_manager.check_integrity()


def test_prefix_reuse_computes_only_the_suffix(local):
    rng = np.random.default_rng()
    prefix = random_prompts(rng, [1024])[0]
    first, second = prefix + random_prompts(rng, [40])[0], prefix + random_prompts(rng, [25])[0]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    engine = make_engine(local, max_num_batched_tokens=2048)
    engine.generate([first], params)
    engine.add_request("second", second, params)
    plan = engine.scheduler.schedule()
    assert plan.num_tokens == 25  # the 1,024 shared tokens (64 full blocks) come from the cache
    result = engine.runner.execute(plan)
    engine.scheduler.update_from_output(plan, result.sampled_token_ids)
    tokens = list(engine.scheduler.take_outputs()[0].new_token_ids)
    while engine.has_unfinished():
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    assert tokens == make_engine(local, enable_prefix_caching=False).generate([second], params)[0].token_ids
    assert engine.stats()["prefix_hit_tokens"] == 1024


def test_small_pool_preempts_and_still_matches(local):
    rng = np.random.default_rng()
    prompts = random_prompts(rng, rng.integers(20, 120, 16))
    params = [SamplingParams(max_tokens=int(rng.integers(8, 40)), temperature=0.0) for _ in prompts]
    expected = [c.token_ids for c in make_engine(local).generate(prompts, params)]
    engine = make_engine(local, num_kv_blocks=14, block_size_tokens=16, max_num_batched_tokens=64)
    tokens = {f"r{i}": [] for i in range(len(prompts))}
    for i, (p, q) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", p, q)
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        engine.block_manager.check_integrity()
    assert [tokens[f"r{i}"] for i in range(len(prompts))] == expected
    assert engine.stats()["num_preemptions"] > 0
    assert engine.block_manager.num_free_blocks == 14  # nothing leaked


def test_request_that_can_never_fit_fails_with_reason(local):
    engine = make_engine(local, num_kv_blocks=4, block_size_tokens=16)
    result = engine.generate([list(range(100))], SamplingParams(max_tokens=10, temperature=0.0))[0]
    assert result.finish_reason == "error" and "KV blocks" in result.error


def test_seeded_sampling_ignores_batch_composition(local):
    rng = np.random.default_rng()
    prompts = random_prompts(rng, [30, 5, 200, 77])
    params = [SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, min_p=0.01, seed=s)
              for s in rng.integers(0, 2**63, 4)]
    together = [c.token_ids for c in make_engine(local).generate(prompts, params)]
    assert together == run_alone(local, prompts, params)
    reseeded = make_engine(local).generate([prompts[0]], [SamplingParams(
        max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, min_p=0.01, seed=params[0].seed + 1)])
    assert reseeded[0].token_ids != together[0]


def test_penalties_change_output_and_stay_batch_independent(local):
    rng = np.random.default_rng()
    prompts = random_prompts(rng, [12, 40])
    params = [SamplingParams(max_tokens=20, temperature=0.0, repetition_penalty=3.0, frequency_penalty=2.0,
                             presence_penalty=2.0),
              SamplingParams(max_tokens=20, temperature=0.0)]
    together = [c.token_ids for c in make_engine(local).generate(prompts, params)]
    assert together == run_alone(local, prompts, params)
    plain = make_engine(local).generate([prompts[0]], SamplingParams(max_tokens=20, temperature=0.0))[0].token_ids
    # Penalties only lower tokens already seen, so the outputs agree until the
    # plain run first picks a seen token; from there the penalised one departs.
    seen = [i for i, t in enumerate(plain) if t in prompts[0] or t in plain[:i]]
    if not seen:
        assert together[0] == plain
    else:
        assert together[0][:seen[0]] == plain[:seen[0]] and together[0] != plain


def test_abort_frees_blocks(local):
    rng = np.random.default_rng()
    engine = make_engine(local)
    for i, prompt in enumerate(random_prompts(rng, [300, 50, 90])):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=50, temperature=0.0))
    engine.step()
    engine.step()
    assert engine.abort("r1")
    while engine.has_unfinished():
        engine.step()
    engine.block_manager.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
    assert engine.stats()["num_running"] == 0


def test_token_ids_checked_whatever_their_container(local):
    """Prompts as lists, NumPy arrays of any integer type or other sequences of numbers reach
    the request as the same ints; an id outside the vocabulary is a ValueError naming the
    field, from the vectorised check and from the per-value one alike."""
    vocab = local.model.config.vocab_size
    rng = np.random.default_rng()
    ids = rng.integers(0, vocab, 50)
    engine = make_engine(local)
    params = SamplingParams(max_tokens=1, temperature=0.0)
    for i, prompt in enumerate([ids.tolist(), ids, ids.astype(np.int32), tuple(ids.tolist()),
                                [float(t) for t in ids]]):
        engine.add_request(f"r{i}", prompt, params)
        stored = engine.scheduler._requests[f"r{i}"].prompt_token_ids   # taken unconverted (CheckedTokens)
        assert list(stored) == ids.tolist() and all(type(t) is int for t in stored)
    direct = Request("direct", ids.astype(np.int32), params)   # not checked before: converted here
    assert direct.prompt_token_ids == tuple(ids.tolist()) and all(type(t) is int for t in direct.prompt_token_ids)
    with pytest.raises(ValueError, match="prompt_token_ids must be >= 0"):
        Request("negative", [3, -2], params)
    for i, bad in enumerate([[0, vocab], np.array([3, -1]), [1.0, float(vocab)]]):
        with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, "):
            engine.add_request(f"bad{i}", bad, params)
    with pytest.raises(ValueError, match="output_token_ids token ids must be in"):
        engine.add_request("bad_out", ids.tolist(), params, output_token_ids=np.array([vocab + 5]))
