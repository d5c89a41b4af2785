"""Expert parallelism: which rank holds which experts, and moving tokens to
them and back (dispatch and combine with all_to_all_v).

Placement is contiguous: E experts over ep ranks, rank r holds experts
[r * E/ep, (r + 1) * E/ep), whole (never sliced); E % ep != 0 is an
`ExpertLayoutError`. The ep group is the model's tensor-parallel group when
tp > 1 (attention split by heads, experts spread over the same ranks) or,
with tp = 1, a group whose ranks run attention replicated. Either way every
rank enters an MoE layer holding the same tokens, so each routes only its
share: rank r takes rows [r * c, min((r + 1) * c, T)), c = ceil(T / ep)
(`token_share`); the last ranks' shares may be short or empty, and the
shares come back together with one all_gather of c-row blocks.

One MoE layer on rank r (`ExpertDispatcher`): route the share (top-k) ->
sort its (token, slot) pairs by expert -> all_gather the per-expert counts
(this also gives the load metric) -> all_to_all_v the pairs' rows to the
experts' owners -> the owner runs each local expert once on its rows ->
all_to_all_v the results back -> weighted sum per token -> gather shares.
With a single-rank group every exchange is the identity and the same code
is the plain grouped MoE.

This module moves rows and counts; it holds no weights and no model code
(the layer passes a function that runs its local experts), and keeps no
state between steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from shardline.kernels.backend import Backend
from shardline.parallel.sharding import TensorParallel


class ExpertLayoutError(ValueError):
    """An expert-parallel layout the model cannot take; the message names the sizes."""


@dataclass(frozen=True)
class ExpertParallel(TensorParallel):
    """This rank's place in its expert-parallel group and the group's
    communicator (the same shape as TensorParallel, a different role)."""


def check_expert_layout(num_experts: int, tp_size: int, ep_size: int) -> None:
    """Raises `ExpertLayoutError` for a layout that cannot be built."""
    if ep_size == 1:
        return
    if num_experts == 0:
        raise ExpertLayoutError(f"ep ({ep_size}) > 1 needs a mixture-of-experts model (num_experts is 0)")
    if num_experts % ep_size:
        raise ExpertLayoutError(f"num_experts ({num_experts}) must be divisible by ep ({ep_size})")
    if tp_size > 1 and tp_size != ep_size:
        raise ExpertLayoutError(f"with tp > 1 the experts are spread over the tp group: ep ({ep_size}) "
                                f"must equal tp ({tp_size})")


@dataclass(frozen=True)
class ExpertPlacement:
    num_experts: int
    num_ranks: int
    rank: int

    def __post_init__(self):
        check_expert_layout(self.num_experts, 1, self.num_ranks)

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def local_experts(self) -> range:
        """Global ids of the experts this rank holds."""
        return range(self.rank * self.experts_per_rank, (self.rank + 1) * self.experts_per_rank)


def token_share(num_tokens: int, num_ranks: int, rank: int) -> tuple[int, int]:
    """[start, stop) of the rows rank `rank` routes; ceil(T / ranks) rows each, the last ones short."""
    per_rank = -(-num_tokens // num_ranks)
    start = min(rank * per_rank, num_tokens)
    return start, min(start + per_rank, num_tokens)


@dataclass(frozen=True)
class ExpertLoad:
    """Expert load of one MoE layer in one forward: how many (token, slot)
    pairs were routed to each expert, over the whole step (every rank's
    share), so sum == num_tokens * top_k. `imbalance_ratio` is max / mean
    over experts: 1.0 is perfectly even; under ep the busiest rank's expert
    work grows with it. A step with no tokens reports 1.0."""

    tokens_per_expert: np.ndarray  # [num_experts] int64

    @property
    def imbalance_ratio(self) -> float:
        mean = float(self.tokens_per_expert.mean()) if self.tokens_per_expert.size else 0.0
        return float(self.tokens_per_expert.max()) / mean if mean > 0 else 1.0


# run_experts(rows [R, hidden] sorted by local expert, rows per local expert) -> [R, hidden]
RunExperts = Callable[[Any, Sequence[int]], Any]


@dataclass(frozen=True)
class _Pairs:
    """This rank's (token, slot) pairs in send order (sorted by expert)."""

    tokens: np.ndarray        # [P] int32: row of the share each pair reads
    order: np.ndarray         # [P] int64: index into the flattened [n, k] routing arrays
    expert_counts: np.ndarray  # [num_experts] int64: pairs per expert


class ExpertDispatcher:
    """Dispatch, expert compute and combine for one MoE layer's experts."""

    def __init__(self, backend: Backend, ep: ExpertParallel, num_experts: int):
        self.backend, self.ops, self.xp, self.ep = backend, backend.ops, backend.xp, ep
        self.placement = ExpertPlacement(num_experts, ep.size, ep.rank)

    def share(self, x):
        """x [T, hidden] (the same on every rank) -> this rank's rows [n, hidden]."""
        start, stop = token_share(x.shape[0], self.ep.size, self.ep.rank)
        return x if (start, stop) == (0, x.shape[0]) else x[start:stop]

    def gather(self, out_share, num_tokens: int):
        """This rank's combined rows [n, hidden] -> every rank's, [T, hidden]."""
        if self.ep.size == 1:
            return out_share
        per_rank = -(-num_tokens // self.ep.size)
        missing = per_rank - out_share.shape[0]
        if missing:
            pad = self.xp.zeros((missing,) + out_share.shape[1:], dtype=out_share.dtype)
            out_share = self.xp.concatenate([out_share, pad])
        return self.ep.comm.all_gather(out_share, axis=0)[:num_tokens]

    def exchange(self, share, weights, expert_ids: np.ndarray, run_experts: RunExperts):
        """share [n, hidden]; weights [n, k] float32 (backend); expert_ids [n, k]
        int (host) -> (combined expert output [n, hidden], ExpertLoad)."""
        pairs = self._sort_pairs(expert_ids)
        counts = self._all_counts(pairs.expert_counts)  # [ranks, experts]
        per_rank = self.placement.experts_per_rank
        send_counts = pairs.expert_counts.reshape(self.ep.size, per_rank).sum(axis=1).tolist()
        mine = counts[:, self.placement.local_experts.start:self.placement.local_experts.stop]  # [ranks, local]
        recv_counts = mine.sum(axis=1).tolist()
        rows, _ = self.ep.comm.all_to_all_v(self._take(share, pairs.tokens), send_counts, recv_counts)
        results = self._run_sorted(rows, mine, run_experts)
        back, _ = self.ep.comm.all_to_all_v(results, recv_counts, send_counts)
        out = self.xp.zeros_like(share)
        if pairs.tokens.size:
            scale = weights.reshape(-1)[self.xp.asarray(pairs.order)]  # [P] float32
            self.ops.scatter_add_rows(out, self.xp.asarray(pairs.tokens), back, scale)
        return out, ExpertLoad(counts.sum(axis=0))

    def _sort_pairs(self, expert_ids: np.ndarray) -> _Pairs:
        flat = np.asarray(expert_ids, dtype=np.int64).reshape(-1)  # [n * k]
        order = np.argsort(flat, kind="stable")
        top_k = expert_ids.shape[1] if expert_ids.ndim == 2 else 1
        return _Pairs((order // top_k).astype(np.int32), order,
                      np.bincount(flat, minlength=self.placement.num_experts).astype(np.int64))

    def _all_counts(self, expert_counts: np.ndarray) -> np.ndarray:
        """Every rank's pairs per expert, [ranks, experts] on the host."""
        if self.ep.size == 1:
            return expert_counts[None]
        gathered = self.ep.comm.all_gather(self.xp.asarray(expert_counts), axis=0)  # [ranks * experts]
        return self.backend.to_numpy(gathered).astype(np.int64).reshape(self.ep.size, -1)

    def _run_sorted(self, rows, counts: np.ndarray, run_experts: RunExperts):
        """rows arrive by source rank, then by expert; run_experts wants them
        by expert: permute, run, permute back. counts [ranks, local experts]."""
        per_expert = counts.sum(axis=0).tolist()
        if self.ep.size == 1 or rows.shape[0] == 0:
            return run_experts(rows, per_expert)  # already sorted by expert
        local = np.tile(np.arange(counts.shape[1]), counts.shape[0])
        expert_of_row = np.repeat(local, counts.reshape(-1))  # [R]
        perm = np.argsort(expert_of_row, kind="stable")
        results = run_experts(self._take(rows, perm), per_expert)
        return self._take(results, np.argsort(perm))

    def _take(self, x, rows: np.ndarray):
        if rows.size == 0:
            return x[:0]
        if rows.size == x.shape[0] and np.array_equal(rows, np.arange(rows.size)):
            return x
        return self.ops.index_rows(x, self.xp.asarray(rows.astype(np.int32)))
