"""BlockManager and block hashes on tiny pools: ref counts, eviction order,
prefix reuse with copy-on-write, KV events, and check_integrity after each
scenario (plus a hypothesis run of random allocate/cache/free sequences)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardline.worker.block_hash import block_hashes, hash_block
from shardline.worker.block_manager import BlockManager, KVEvent
from shardline.worker.request import Request
from shardline.worker.sampling_params import SamplingParams


def make_request(request_id: str, tokens, max_tokens: int = 8) -> Request:
    return Request(request_id, tuple(tokens), SamplingParams(max_tokens=max_tokens, seed=0))


def admit(manager: BlockManager, request: Request) -> bool:
    """Look up the prefix, take it plus the rest of the known tokens, as the scheduler does."""
    computed = manager.get_computed_blocks(request)
    if not manager.allocate_slots(request, request.num_tokens - computed.num_tokens, computed):
        return False
    request.num_computed_tokens = request.num_tokens
    manager.cache_full_blocks(request)
    manager.check_integrity()
    return True


# ---- block hashes -------------------------------------------------------

def test_block_hashes_cover_full_blocks_only_and_chain():
    tokens = list(range(100, 111))
    hashes = block_hashes(tokens, 4)
    assert len(hashes) == 2                       # 11 tokens: two full blocks, the partial one left out
    assert hashes == block_hashes(tokens[:8], 4)
    assert hashes[1] == hash_block(hashes[0], tokens[4:8])
    assert block_hashes(tokens[4:8], 4, parent=hashes[0]) == hashes[1:]
    assert block_hashes([1, 2, 3, 4], 4) != block_hashes([1, 2, 3, 5], 4)
    # The same block after a different prefix hashes differently.
    assert block_hashes([9, 9, 9, 9, 1, 2, 3, 4], 4)[1] != block_hashes([1, 2, 3, 4], 4)[0]
    assert all(0 <= h < 2**64 for h in hashes)


@given(st.lists(st.integers(0, 2**31 - 1), max_size=70), st.integers(1, 9), st.none() | st.integers(0, 2**64 - 1))
def test_block_hashes_are_blake2b_of_the_parent_and_the_tokens(tokens, block, parent):
    """Each block's hash against blake2b (8 bytes) of its parent's hash (8 bytes, little-endian;
    none for the first) and its tokens as little-endian int32, computed here in NumPy."""
    want, chain = [], parent
    for start in range(0, len(tokens) - block + 1, block):
        data = np.asarray(tokens[start:start + block], dtype="<i4").tobytes()
        prefix = b"" if chain is None else chain.to_bytes(8, "little")
        chain = int.from_bytes(hashlib.blake2b(prefix + data, digest_size=8).digest(), "little")
        want.append(chain)
    assert block_hashes(tokens, block, parent) == want


def test_block_hashes_are_stable_across_processes():
    code = "from shardline.worker.block_hash import block_hashes; print(block_hashes(list(range(64)), 16))"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert runs == {f"{block_hashes(list(range(64)), 16)}\n"}


def test_block_hashes_reject_bad_input():
    with pytest.raises(ValueError, match="^block_size_tokens"):
        block_hashes([1, 2], 0)
    with pytest.raises(ValueError, match="^token_ids"):
        block_hashes([2**31], 1)


# ---- allocation ---------------------------------------------------------

def test_allocate_grow_and_free():
    manager = BlockManager(num_blocks=4, block_size_tokens=4)
    request = make_request("a", range(6))
    assert manager.allocate_slots(request, 6)
    assert manager.block_table("a") == [0, 1]
    assert manager.usage() == 0.5
    request.num_computed_tokens = 6
    assert manager.allocate_slots(request, 2)      # 8 tokens still fit in two blocks
    assert manager.block_table("a") == [0, 1]
    assert manager.allocate_slots(request, 3)
    assert manager.block_table("a") == [0, 1, 2]
    manager.check_integrity()
    manager.free(request)
    assert manager.num_free_blocks == 4 and manager.usage() == 0.0
    assert manager.block_table("a") == []
    manager.check_integrity()


def test_allocate_failure_changes_nothing():
    manager = BlockManager(num_blocks=3, block_size_tokens=2)
    first, second = make_request("a", range(4)), make_request("b", range(10, 14))
    assert admit(manager, first)
    assert not manager.allocate_slots(second, 4)
    assert manager.block_table("b") == [] and manager.num_free_blocks == 1
    assert not manager.allocate_slots(first, 3)
    assert manager.block_table("a") == [0, 1]
    manager.check_integrity()


def test_free_list_evicts_least_recently_freed_and_later_blocks_first():
    manager = BlockManager(num_blocks=6, block_size_tokens=2)
    first, second = make_request("a", range(6)), make_request("b", range(10, 16))
    admit(manager, first)
    admit(manager, second)                          # a: [0, 1, 2], b: [3, 4, 5], all hashed
    manager.free(first)
    manager.free(second)
    manager.take_events()
    taker = make_request("c", range(20, 28))
    assert manager.allocate_slots(taker, 8)
    # a was freed first, and its last block goes before its first.
    assert manager.block_table("c") == [2, 1, 0, 5]
    removed = manager.take_events()
    assert [e.kind for e in removed] == ["removed"] and len(removed[0].block_hashes) == 4
    manager.check_integrity()


def test_unhashed_blocks_are_reused_before_cached_ones():
    manager = BlockManager(num_blocks=4, block_size_tokens=2)
    cached, partial = make_request("a", range(4)), make_request("b", range(10, 13))
    admit(manager, cached)                          # [0, 1], both full
    admit(manager, partial)                         # [2, 3]: block 3 half full, no hash
    manager.free(cached)
    manager.free(partial)
    taker = make_request("c", range(20, 22))
    assert manager.allocate_slots(taker, 2)
    assert manager.block_table("c") == [3]
    assert manager.take_events()[-1].kind == "stored"   # nothing evicted yet


# ---- prefix reuse -------------------------------------------------------

def test_prefix_hit_shares_blocks_and_counts_stats():
    manager = BlockManager(num_blocks=8, block_size_tokens=4)
    first = make_request("a", range(10))
    admit(manager, first)
    assert manager.take_events() == [KVEvent("stored", tuple(block_hashes(list(range(10)), 4)))]
    second = make_request("b", [*range(8), 50, 51, 52])
    computed = manager.get_computed_blocks(second)
    assert computed.block_ids == (0, 1) and computed.num_tokens == 8 and not computed.rewrites_last_block
    assert manager.allocate_slots(second, 3, computed)
    assert manager.block_table("b")[:2] == [0, 1] and manager.block_table("b")[2] not in (0, 1, 2)
    assert manager.prefix_stats().hit_tokens == 8 and manager.prefix_stats().query_tokens == 11
    manager.check_integrity()
    manager.free(first)
    manager.check_integrity()                       # shared blocks still held by b
    assert manager.num_free_blocks == 8 - 3


def test_whole_prompt_hit_on_shared_block_copies_on_write():
    manager = BlockManager(num_blocks=6, block_size_tokens=4)
    first = make_request("a", range(8))
    admit(manager, first)                           # [0, 1], both cached and held
    second = make_request("b", range(8))
    computed = manager.get_computed_blocks(second)
    assert computed.num_tokens == 7 and computed.rewrites_last_block    # the last token is recomputed
    assert manager.allocate_slots(second, 1, computed)
    table = manager.block_table("b")
    assert table[0] == 0 and table[1] not in (0, 1)
    manager.check_integrity()                       # the copy source stays pinned until taken
    assert manager.take_block_copies() == [(1, table[1])]
    assert manager.take_block_copies() == []
    manager.check_integrity()
    second.num_computed_tokens = 8
    manager.cache_full_blocks(second)               # duplicate of block 1: stays unhashed
    assert manager.cached_block_hashes() == frozenset(block_hashes(list(range(8)), 4))
    manager.free(first)
    manager.free(second)
    assert manager.num_free_blocks == 6
    manager.check_integrity()


def test_whole_prompt_hit_on_free_block_takes_it_over():
    manager = BlockManager(num_blocks=2, block_size_tokens=4)
    first = make_request("a", range(8))
    admit(manager, first)
    manager.free(first)
    manager.take_events()
    again = make_request("b", range(8), max_tokens=1)   # needs the whole pool: no room for a copy
    assert admit(manager, again)
    assert manager.block_table("b") == [0, 1] and manager.take_block_copies() == []
    hashes = block_hashes(list(range(8)), 4)
    # Out of the cache while its last slot is rewritten, back in once computed.
    assert manager.take_events() == [KVEvent("removed", (hashes[1],)), KVEvent("stored", (hashes[1],))]
    manager.check_integrity()


def test_prefix_caching_disabled_finds_nothing_and_emits_nothing():
    manager = BlockManager(num_blocks=8, block_size_tokens=2, enable_prefix_caching=False)
    admit(manager, make_request("a", range(6)))
    second = make_request("b", range(6))
    assert manager.get_computed_blocks(second).num_tokens == 0
    assert manager.take_events() == [] and manager.cached_block_hashes() == frozenset()


def test_lookup_for_a_request_holding_blocks_is_refused():
    manager = BlockManager(num_blocks=4, block_size_tokens=2)
    request = make_request("a", range(3))
    admit(manager, request)
    with pytest.raises(ValueError, match="already holds blocks"):
        manager.get_computed_blocks(request)


def test_check_integrity_names_the_violation():
    manager = BlockManager(num_blocks=4, block_size_tokens=2)
    admit(manager, make_request("a", range(3)))
    manager._ref_counts[0] += 1
    with pytest.raises(AssertionError, match="block 0: ref count 2 but 1 owners"):
        manager.check_integrity()
    manager._ref_counts[0] -= 1
    manager._free[0] = None
    with pytest.raises(AssertionError, match="in free list"):
        manager.check_integrity()


# ---- random sequences ---------------------------------------------------

operations = st.lists(st.tuples(st.sampled_from(["admit", "grow", "free"]), st.integers(0, 5),
                                st.integers(1, 9)), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(num_blocks=st.integers(1, 12), block_size_tokens=st.integers(1, 4), ops=operations,
       caching=st.booleans())
def test_random_operations_keep_invariants_and_events_consistent(num_blocks, block_size_tokens, ops, caching):
    manager = BlockManager(num_blocks, block_size_tokens, caching)
    live: dict[int, Request] = {}
    findable: set[int] = set()
    for step, (op, slot, num_tokens) in enumerate(ops):
        request = live.get(slot)
        if op == "admit" and request is None:
            # Prompts from three stems so that prefixes repeat.
            candidate = make_request(f"r{step}", [slot % 3] * 3 + list(range(num_tokens)))
            if admit(manager, candidate):
                live[slot] = candidate
        elif op == "grow" and request is not None:
            request.output_token_ids.extend(range(num_tokens))
            if manager.allocate_slots(request, num_tokens):
                request.num_computed_tokens += num_tokens
                manager.cache_full_blocks(request)
            else:
                request.output_token_ids[-num_tokens:] = []
        elif op == "free" and request is not None:
            manager.free(live.pop(slot))
        manager.take_block_copies()
        for event in manager.take_events():
            hashes = set(event.block_hashes)
            if event.kind == "stored":
                assert not hashes & findable, "stored twice without a removal"
                findable |= hashes
            else:
                assert hashes <= findable, "removed a hash never stored"
                findable -= hashes
        manager.check_integrity()
        assert findable == manager.cached_block_hashes()
    for request in live.values():
        manager.free(request)
    manager.check_integrity()
    assert manager.num_free_blocks == num_blocks
