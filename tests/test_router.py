"""Router policies on plain candidates: round robin, least loaded, and
KV-aware with DESIGN.md's cost (argmin and softmax), the busy threshold,
unhealthy groups, the predicted prefix hit rate."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from shardline.coordinator.cluster_config import RouterConfig
from shardline.coordinator.prefix_index import PrefixIndex
from shardline.coordinator.router import Candidate, KVAwarePolicy, Router, Scored
from shardline.proto import worker_pb2 as wpb
from shardline.worker.block_hash import block_hashes

BLOCK = 16


def cand(name, healthy=True, kv_usage=0.0, in_flight=0, active_blocks=0, block_size=BLOCK) -> Candidate:
    return Candidate(name, healthy, kv_usage, in_flight, active_blocks, block_size)


def index_with(**cached: list[int]) -> PrefixIndex:
    index = PrefixIndex()
    for group, token_ids in cached.items():
        index.apply(group, wpb.KVEventBatch(sequence_number=0, snapshot=True,
                                            snapshot_hashes=block_hashes(token_ids, BLOCK)))
    return index


def router(policy="kv_aware", index=None, seed=0, **settings) -> Router:
    return Router(RouterConfig(policy=policy, **settings), index or PrefixIndex(), random.Random(seed))


PROMPT = list(range(100, 100 + 10 * BLOCK + 5))  # 10 full blocks and a partial one


def test_round_robin_takes_turns_and_skips_unhealthy():
    r = router("round_robin")
    groups = [cand("a"), cand("b", healthy=False), cand("c")]
    assert [r.choose(groups, PROMPT).group for _ in range(4)] == ["a", "c", "a", "c"]


def test_least_loaded_picks_fewest_in_flight():
    r = router("least_loaded")
    assert r.choose([cand("a", in_flight=3), cand("b", in_flight=1), cand("c", in_flight=2)], PROMPT).group == "b"


def test_cost_formula():
    policy = KVAwarePolicy(overlap_weight=2.0, temperature=0.0, rng=random.Random(0))
    scored = Scored(cand("a", active_blocks=7), prompt_blocks=10, cached_blocks=4)
    assert policy.cost(scored) == 2.0 * (10 - 4) + 7
    assert policy.cost(Scored(cand("a"), prompt_blocks=3, cached_blocks=3)) == 0


def test_kv_aware_prefers_the_cached_prefix_until_load_outweighs_it():
    index = index_with(a=PROMPT[:8 * BLOCK])  # a caches 8 of the 10 blocks
    r = router(index=index, overlap_weight=1.0)
    route = r.choose([cand("a", active_blocks=5), cand("b")], PROMPT)
    # cost a = 1 * (10 - 8) + 5 = 7 < cost b = 10
    assert (route.group, route.prompt_blocks, route.cached_blocks) == ("a", 10, 8)
    # cost a = 2 + 9 = 11 > 10
    assert r.choose([cand("a", active_blocks=9), cand("b")], PROMPT).group == "b"
    assert r.prefix_hit_rate == pytest.approx(8 / 20)


def test_cached_blocks_count_only_the_leading_chain():
    other = PROMPT[:BLOCK] + [7] * BLOCK + PROMPT[2 * BLOCK:]  # same first block, then different
    r = router(index=index_with(a=other))
    assert r.choose([cand("a")], PROMPT).cached_blocks == 1


def test_block_size_per_group():
    index = PrefixIndex()
    index.apply("a", wpb.KVEventBatch(snapshot=True, snapshot_hashes=block_hashes(PROMPT, 32)))
    route = router(index=index).choose([cand("a", block_size=32)], PROMPT)
    assert (route.prompt_blocks, route.cached_blocks) == (5, 5)


def test_busy_groups_skipped_unless_all_are():
    r = router(index=index_with(a=PROMPT), busy_threshold=0.9)
    assert r.choose([cand("a", kv_usage=0.95), cand("b", kv_usage=0.5)], PROMPT).group == "b"
    assert r.choose([cand("a", kv_usage=0.95), cand("b", kv_usage=0.99)], PROMPT).group == "a"


def test_unhealthy_never_chosen():
    r = router(index=index_with(a=PROMPT))
    assert r.choose([cand("a", healthy=False), cand("b", active_blocks=1000)], PROMPT).group == "b"
    assert r.choose([cand("a", healthy=False)], PROMPT) is None
    assert r.choose([], PROMPT) is None


def test_argmin_ties_are_spread():
    r = router(seed=1)
    picks = Counter(r.choose([cand("a"), cand("b"), cand("c")], PROMPT).group for _ in range(300))
    assert set(picks) == {"a", "b", "c"} and min(picks.values()) > 60


def test_argmin_ties_go_to_the_group_routed_least_lately():
    now = [0.0]
    r = Router(RouterConfig(recent_load_half_life_s=2.0), index_with(a=PROMPT), random.Random(0), clock=lambda: now[0])
    groups = [cand("a"), cand("b"), cand("c")]
    assert r.choose(groups, PROMPT).group == "a"            # cached on a: no tie
    other = list(range(900, 900 + 3 * BLOCK))                # cached nowhere: a tie of a, b and c
    second = r.choose(groups, other).group                   # a took 10 blocks lately
    assert second in {"b", "c"}
    third = r.choose(groups, other[:2 * BLOCK]).group         # second took 3
    assert {second, third} == {"b", "c"} and r.recent_load(third) == 2
    assert r.recent_load("a") == 10
    now[0] = 4.0                                             # two half-lives later
    assert r.recent_load("a") == pytest.approx(2.5)


def test_softmax_spreads_a_single_hot_prefix():
    index = index_with(a=PROMPT)  # the hot prefix lives on a only
    groups = [cand("a"), cand("b")]
    argmin = router(index=index)
    assert {argmin.choose(groups, PROMPT).group for _ in range(100)} == {"a"}
    soft = router(index=index, temperature=10.0, seed=3)
    picks = Counter(soft.choose(groups, PROMPT).group for _ in range(1000))
    # P(b) = e^-1 / (1 + e^-1) = 0.27: cost a = 0, cost b = 10 uncached blocks, T = 10
    assert 0.2 < picks["b"] / 1000 < 0.35


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
