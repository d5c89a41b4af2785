"""Which engine group serves a request.

The router filters the candidates (healthy only; those above the KV busy
threshold only when some group is below it), scores each by how much of
the prompt it caches (from the PrefixIndex) and hands the scored list to a
policy object:

- `round_robin`: in turn;
- `least_loaded`: fewest requests the coordinator has in flight there;
- `kv_aware`: DESIGN.md's cost
  `overlap_weight * max(prompt_blocks - cached_blocks, 0) + active_blocks`,
  argmin, or with `temperature` > 0 a draw from
  softmax(-(cost - min cost) / temperature), which spreads a single hot
  prefix over several groups. Argmin ties go to the group routed the least
  work lately (`RecentLoad`, decayed with a half-life), then at random: a
  new prefix, costing the same everywhere, lands where traffic has been
  lightest, so the prefixes (and the users behind them) are spread evenly
  even when the cluster is too idle for `active_blocks` to differ.

It returns the group and the predicted cached blocks, and keeps the
predicted prefix hit rate. It must not touch channels, streams or the
registry's state: it sees plain `Candidate` snapshots.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from shardline.coordinator.cluster_config import RouterConfig
from shardline.coordinator.prefix_index import PrefixIndex
from shardline.worker.block_hash import block_hashes


@dataclass(frozen=True)
class Candidate:
    name: str
    healthy: bool
    kv_usage: float          # fraction of the group's KV blocks in use (from its heartbeat)
    num_in_flight: int       # requests the coordinator has in flight there
    active_blocks: int       # their KV blocks
    block_size_tokens: int


@dataclass(frozen=True)
class Scored:
    candidate: Candidate
    prompt_blocks: int       # full blocks of the prompt at this group's block size
    cached_blocks: int       # of those, the leading ones the group caches

    @property
    def uncached_blocks(self) -> int:
        return max(self.prompt_blocks - self.cached_blocks, 0)


@dataclass(frozen=True)
class Route:
    group: str
    prompt_blocks: int
    cached_blocks: int


class Policy(Protocol):
    def pick(self, scored: Sequence[Scored]) -> Scored: ...


class RoundRobinPolicy:
    def __init__(self) -> None:
        self._turn = 0

    def pick(self, scored: Sequence[Scored]) -> Scored:
        ordered = sorted(scored, key=lambda s: s.candidate.name)
        choice = ordered[self._turn % len(ordered)]
        self._turn += 1
        return choice


class LeastLoadedPolicy:
    def pick(self, scored: Sequence[Scored]) -> Scored:
        return min(scored, key=lambda s: (s.candidate.num_in_flight, s.candidate.active_blocks, s.candidate.name))


class RecentLoad:
    """Prompt blocks routed to each group, decayed with a half-life."""

    def __init__(self, half_life_s: float, clock: Callable[[], float] = time.monotonic):
        self.half_life_s = half_life_s
        self._clock = clock
        self._load: dict[str, tuple[float, float]] = {}   # group -> (load, at time)

    def __call__(self, name: str) -> float:
        load, at = self._load.get(name, (0.0, 0.0))
        return load * 0.5 ** ((self._clock() - at) / self.half_life_s)

    def add(self, name: str, blocks: int) -> None:
        self._load[name] = (self(name) + max(blocks, 1), self._clock())


class KVAwarePolicy:
    def __init__(self, overlap_weight: float, temperature: float, rng: random.Random,
                 recent_load: RecentLoad | None = None):
        self.overlap_weight = overlap_weight
        self.temperature = temperature
        self._rng = rng
        self._recent_load = recent_load

    def cost(self, scored: Scored) -> float:
        return self.overlap_weight * scored.uncached_blocks + scored.candidate.active_blocks

    def pick(self, scored: Sequence[Scored]) -> Scored:
        costs = [self.cost(s) for s in scored]
        best = min(costs)
        if self.temperature > 0:
            weights = [math.exp(-(c - best) / self.temperature) for c in costs]
            return self._rng.choices(list(scored), weights=weights)[0]
        ties = [s for s, c in zip(scored, costs) if c == best]
        if len(ties) > 1 and self._recent_load is not None:
            lightest = min(self._recent_load(s.candidate.name) for s in ties)
            ties = [s for s in ties if self._recent_load(s.candidate.name) <= lightest]
        return ties[0] if len(ties) == 1 else self._rng.choice(ties)


def make_policy(config: RouterConfig, rng: random.Random, recent_load: RecentLoad) -> Policy:
    if config.policy == "round_robin":
        return RoundRobinPolicy()
    if config.policy == "least_loaded":
        return LeastLoadedPolicy()
    return KVAwarePolicy(config.overlap_weight, config.temperature, rng, recent_load)


class Router:
    def __init__(self, config: RouterConfig, index: PrefixIndex, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.index = index
        self.recent_load = RecentLoad(config.recent_load_half_life_s, clock)
        self.policy = make_policy(config, rng or random.Random(), self.recent_load)
        self.routed_prompt_blocks = 0
        self.predicted_cached_blocks = 0

    def eligible(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        """Healthy candidates; of those, the ones not over the busy threshold unless all are."""
        healthy = [c for c in candidates if c.healthy]
        calm = [c for c in healthy if c.kv_usage <= self.config.busy_threshold]
        return calm or healthy

    def score(self, candidates: Sequence[Candidate], prompt_token_ids: Sequence[int]) -> list[Scored]:
        hashes_by_block_size: dict[int, list[int]] = {}
        scored = []
        for c in candidates:
            if c.block_size_tokens not in hashes_by_block_size:
                hashes_by_block_size[c.block_size_tokens] = block_hashes(prompt_token_ids, c.block_size_tokens)
            hashes = hashes_by_block_size[c.block_size_tokens]
            scored.append(Scored(c, len(hashes), self.index.cached_blocks(c.name, hashes)))
        return scored

    def choose(self, candidates: Sequence[Candidate], prompt_token_ids: Sequence[int],
               record: bool = True) -> Route | None:
        """None when no candidate is healthy. `record`: count it in the prefix hit rate."""
        eligible = self.eligible(candidates)
        if not eligible:
            return None
        choice = self.policy.pick(self.score(eligible, prompt_token_ids))
        self.recent_load.add(choice.candidate.name, choice.prompt_blocks)
        if record:
            self.routed_prompt_blocks += choice.prompt_blocks
            self.predicted_cached_blocks += choice.cached_blocks
        return Route(choice.candidate.name, choice.prompt_blocks, choice.cached_blocks)

    @property
    def prefix_hit_rate(self) -> float:
        """Predicted cached share of the prompt blocks routed so far."""
        return self.predicted_cached_blocks / self.routed_prompt_blocks if self.routed_prompt_blocks else 0.0
