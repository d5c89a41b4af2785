"""Paged KV-cache allocator: fixed-size blocks, ref counts, prefix reuse.

The BlockManager is the only writer of every request's block table. Blocks
whose ref count drops to 0 go to a free list kept in eviction order; those
that carry a prefix hash stay findable there until they are evicted. It is
pure Python bookkeeping on the group leader: it must not touch the KV
tensors (it records block copies for the ModelRunner to do), decide which
request runs (the Scheduler's job), or import GPU or model code.

Invariants (`check_integrity`):
- a block's ref count = the block tables holding it + pending copies reading it;
- the free list holds exactly the blocks whose ref count is 0;
- a block with a hash is full, its K/V never change while it keeps the hash,
  and the hash map and the per-block hashes agree.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

from shardline.worker.block_hash import block_hashes
from shardline.worker.request import Request


@dataclass(frozen=True)
class KVEvent:
    """For the router's prefix index: full blocks that became findable or stopped being."""

    kind: Literal["stored", "removed"]
    block_hashes: tuple[int, ...]


@dataclass(frozen=True)
class ComputedBlocks:
    """A prefix-cache hit from `get_computed_blocks`; nothing is held until `allocate_slots`."""

    block_ids: tuple[int, ...]   # cached blocks holding the prefix, in table order
    num_tokens: int              # prefix tokens that need no compute
    # The hit covered every known token; the last one is recomputed anyway (its
    # logits are needed), which writes into the last block: that block is copied
    # (when shared) or taken out of the cache (when free) first.
    rewrites_last_block: bool


NO_PREFIX_HIT = ComputedBlocks((), 0, False)


@dataclass(frozen=True)
class PrefixCacheStats:
    query_tokens: int   # tokens of requests looked up (once per admission)
    hit_tokens: int     # of those, tokens found in the cache

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size_tokens: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        if block_size_tokens < 1:
            raise ValueError(f"block_size_tokens must be at least 1, got {block_size_tokens}")
        self.num_blocks, self.block_size_tokens = num_blocks, block_size_tokens
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._hash_of_block: list[int | None] = [None] * num_blocks
        self._block_of_hash: dict[int, int] = {}
        # Front = evicted first. Keys only; OrderedDict gives O(1) removal from the middle.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._tables: dict[str, list[int]] = {}
        self._num_hashed_blocks: dict[str, int] = {}    # table prefix already offered to the cache
        self._request_hashes: dict[str, list[int]] = {}
        self._pending_copies: list[tuple[int, int]] = []
        self._events: list[KVEvent] = []
        self._query_tokens = self._hit_tokens = 0

    # ---- queries -------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        """Fraction of blocks held by requests (free cached blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def block_table(self, request_id: str) -> list[int]:
        return list(self._tables.get(request_id, ()))

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size_tokens)

    def cached_block_hashes(self) -> frozenset[int]:
        """Every findable hash: a full snapshot for a router that lost the event stream."""
        return frozenset(self._block_of_hash)

    def prefix_stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self._query_tokens, self._hit_tokens)

    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    def take_block_copies(self) -> list[tuple[int, int]]:
        """(src, dst) copies the next step must do before its forward.

        Sources stay pinned until taken so that nothing reuses them in the
        same scheduling pass; the copies run before any later step writes.
        """
        copies, self._pending_copies = self._pending_copies, []
        for src, _ in copies:
            self._release(src)
        return copies

    # ---- prefix cache --------------------------------------------------

    def get_computed_blocks(self, request: Request) -> ComputedBlocks:
        """The longest run of the request's full blocks found in the cache.

        Call `allocate_slots(request, n, computed)` right after, with no other
        call in between, to take the blocks. Never covers every known token.
        """
        if request.request_id in self._tables:
            raise ValueError(f"request {request.request_id} already holds blocks")
        if not self.enable_prefix_caching:
            return NO_PREFIX_HIT
        blocks: list[int] = []
        for block_hash in self._hashes(request, request.num_tokens // self.block_size_tokens):
            block = self._block_of_hash.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        num_tokens = len(blocks) * self.block_size_tokens
        rewrites_last = num_tokens >= request.num_tokens
        return ComputedBlocks(tuple(blocks), min(num_tokens, request.num_tokens - 1), rewrites_last)

    def cache_full_blocks(self, request: Request) -> None:
        """Give a hash to the request's blocks that its computed tokens filled."""
        table = self._tables.get(request.request_id)
        if not self.enable_prefix_caching or not table:
            return
        num_full = min(request.num_computed_tokens // self.block_size_tokens, len(table))
        start = self._num_hashed_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes, stored = self._hashes(request, num_full), []
        for index in range(start, num_full):
            block, block_hash = table[index], hashes[index]
            # A duplicate (another request computed the same block first) stays unhashed.
            if self._hash_of_block[block] is None and block_hash not in self._block_of_hash:
                self._hash_of_block[block] = block_hash
                self._block_of_hash[block_hash] = block
                stored.append(block_hash)
        self._num_hashed_blocks[request.request_id] = num_full
        if stored:
            self._events.append(KVEvent("stored", tuple(stored)))

    # ---- allocation ----------------------------------------------------

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed: ComputedBlocks | None = None) -> bool:
        """Grow the request's table to cover its computed tokens plus `num_new_tokens`.

        With `computed` (from `get_computed_blocks`, for a request holding no
        blocks) the cached prefix is shared first. Returns False, changing
        nothing, when the free list is too short.
        """
        table = self._tables.get(request.request_id)
        # The common decode step: the table already covers it (num_blocks_for(n) <= len(table), inlined).
        if computed is None and table is not None \
                and request.num_computed_tokens + num_new_tokens <= len(table) * self.block_size_tokens:
            return True
        computed = computed or NO_PREFIX_HIT
        table = [] if table is None else table
        if computed.block_ids and table:
            raise ValueError(f"request {request.request_id} already holds blocks")
        start = computed.num_tokens if computed.block_ids else request.num_computed_tokens
        num_needed = self.num_blocks_for(start + num_new_tokens) - len(table) - len(computed.block_ids)
        copy_last = computed.rewrites_last_block and self._ref_counts[computed.block_ids[-1]] > 0
        num_fresh = max(num_needed, 0) + int(copy_last)
        num_revived = sum(1 for b in computed.block_ids if self._ref_counts[b] == 0)
        if num_fresh + num_revived > len(self._free):
            return False
        table = self._tables.setdefault(request.request_id, table)
        removed: list[int] = []
        self._share_prefix(table, computed, copy_last, removed)
        table.extend(self._take_free_block(removed) for _ in range(max(num_needed, 0)))
        if computed.block_ids:
            self._num_hashed_blocks[request.request_id] = computed.num_tokens // self.block_size_tokens
            self._query_tokens += request.num_tokens
            self._hit_tokens += computed.num_tokens
        if removed:
            self._events.append(KVEvent("removed", tuple(removed)))
        return True

    def _share_prefix(self, table: list[int], computed: ComputedBlocks, copy_last: bool,
                      removed: list[int]) -> None:
        # Take every hit block first so that fresh allocations cannot evict them.
        for block in computed.block_ids:
            self._hold(block)
        table.extend(computed.block_ids)
        if not computed.rewrites_last_block:
            return
        last = table[-1]
        if copy_last:
            # Shared: the table's hold becomes the copy's pin; the request writes a private copy.
            table[-1] = self._take_free_block(removed)
            self._pending_copies.append((last, table[-1]))
        else:
            # Nobody else holds it: keep it, but out of the cache while its last slot is rewritten.
            self._uncache(last, removed)

    def free(self, request: Request) -> None:
        """Release the request's blocks; the later blocks of it are evicted first."""
        rid = request.request_id
        self._num_hashed_blocks.pop(rid, None)
        self._request_hashes.pop(rid, None)
        for block in reversed(self._tables.pop(rid, [])):
            self._release(block)

    # ---- internals -----------------------------------------------------

    def _hashes(self, request: Request, num_full_blocks: int) -> list[int]:
        hashes = self._request_hashes.setdefault(request.request_id, [])
        if len(hashes) < num_full_blocks:
            start, end = len(hashes) * self.block_size_tokens, num_full_blocks * self.block_size_tokens
            parent = hashes[-1] if hashes else None
            hashes.extend(block_hashes(request.tokens(start, end), self.block_size_tokens, parent))
        return hashes

    def _hold(self, block: int) -> None:
        if self._ref_counts[block] == 0:
            del self._free[block]
        self._ref_counts[block] += 1

    def _release(self, block: int) -> None:
        self._ref_counts[block] -= 1
        if self._ref_counts[block] == 0:
            self._free[block] = None
            if self._hash_of_block[block] is None:
                # Holds nothing findable: reuse it before any cached block.
                self._free.move_to_end(block, last=False)

    def _take_free_block(self, removed: list[int]) -> int:
        block, _ = self._free.popitem(last=False)
        self._uncache(block, removed)
        self._ref_counts[block] = 1
        return block

    def _uncache(self, block: int, removed: list[int]) -> None:
        block_hash = self._hash_of_block[block]
        if block_hash is not None:
            del self._block_of_hash[block_hash]
            self._hash_of_block[block] = None
            removed.append(block_hash)

    def check_integrity(self) -> None:
        """Raise AssertionError naming the first broken invariant."""
        owners = [0] * self.num_blocks
        for rid, table in self._tables.items():
            if len(set(table)) != len(table):
                raise AssertionError(f"request {rid} holds a block twice: {table}")
            for block in table:
                owners[block] += 1
        for src, dst in self._pending_copies:
            owners[src] += 1
            if self._ref_counts[dst] == 0:
                raise AssertionError(f"copy destination {dst} is free")
        for block, (refs, owned) in enumerate(zip(self._ref_counts, owners)):
            if refs != owned:
                raise AssertionError(f"block {block}: ref count {refs} but {owned} owners")
            if (block in self._free) != (refs == 0):
                raise AssertionError(f"block {block}: ref count {refs} but in free list: {block in self._free}")
        self._check_hash_map()

    def _check_hash_map(self) -> None:
        hashed = [b for b, h in enumerate(self._hash_of_block) if h is not None]
        if len(hashed) != len(self._block_of_hash):
            raise AssertionError(f"{len(hashed)} blocks carry a hash but the map has {len(self._block_of_hash)}")
        for block_hash, block in self._block_of_hash.items():
            if self._hash_of_block[block] != block_hash:
                raise AssertionError(f"hash {block_hash:#x} maps to block {block}, "
                                     f"which carries {self._hash_of_block[block]}")
        for rid, num_hashed in self._num_hashed_blocks.items():
            if num_hashed > len(self._tables.get(rid, ())):
                raise AssertionError(f"request {rid}: {num_hashed} blocks hashed but table is shorter")
