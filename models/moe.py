"""Mixture-of-experts layers shared by the MoE model files (Mixtral, Qwen2-MoE).

`SparseMoE`: softmax top-k routing (renormalised over the top k or not),
each expert run once on its rows (tokens sorted by expert: one GEMM pair
per expert), outputs combined with the gate weights, plus an optional
`SharedExpert` (Qwen2-MoE's always-on expert with a sigmoid gate). Up to
`dense_max_tokens` tokens on one expert group (ep = 1) every expert runs on
every token instead, scaled by its routing weight (0 where not chosen); and
where a step's (token, slot) pairs are fewer than the experts, each pair runs
its expert alone (`ops.expert_linear`: the expert picked on the device, so only
the chosen experts' weights are read). Neither syncs with the host, so such a
decode step is captured in a CUDA graph.

Two layouts, chosen by the `ExpertParallel` group the model is built with:
- ep = 1: every rank holds every expert, split over tp like a dense MLP
  (its slice of each expert's intermediate dimension); the partial outputs
  of all experts (and the shared expert) are reduced once over tp.
- ep > 1: each rank holds num_experts / ep whole experts and the shared
  expert whole; tokens move with all-to-all (parallel/experts.py).

`MoEForCausalLM` is the Llama-family model that takes the keyword `ep`.
Layers only: the one thing a layer writes during forward is its load
metric, `SparseMoE.last_expert_load` (read by metrics, never by compute).
"""

from __future__ import annotations

import numpy as np

from shardline.kernels.backend import Backend
from shardline.models.config import ModelConfig
from shardline.models.layers import GatedMLP
from shardline.models.llama import LlamaForCausalLM, gated_mlp
from shardline.models.weights import WeightReader
from shardline.parallel.experts import (ExpertDispatcher, ExpertLoad, ExpertParallel, ExpertPlacement,
                                        check_expert_layout)
from shardline.parallel.sharding import TensorParallel


class SharedExpert:
    """An always-on expert scaled per token by sigmoid(x @ gate^T)."""

    def __init__(self, backend: Backend, mlp: GatedMLP, gate_weight: np.ndarray):
        self.ops, self.xp, self.mlp = backend.ops, backend.xp, mlp
        # [2, hidden]: a zero row next to the gate, so the logits are [z, 0] and
        # softmax's first column is sigmoid(z): the gating kernel serves on both backends.
        self.gate_pair = backend.asarray(np.concatenate([gate_weight, np.zeros_like(gate_weight)]))

    def add_to(self, out, x) -> None:
        """out [n, hidden] += sigmoid(gate(x)) * mlp(x), in place."""
        num_tokens = x.shape[0]
        if num_tokens == 0:
            return
        probs, ids = self.ops.topk_softmax(self.ops.linear(x, self.gate_pair), 2, False)  # [n, 2] each
        gate = self.xp.where(ids[:, 0] == 0, probs[:, 0], probs[:, 1])  # [n] float32
        rows = self.xp.arange(num_tokens, dtype=self.xp.int32)
        self.ops.scatter_add_rows(out, rows, self.mlp(x), gate)


class SparseMoE:
    """Routed experts (this rank's) plus an optional shared expert.

    `last_expert_load` is the expert-load metric of the latest forward
    (`ExpertLoad`: tokens per expert over the whole step, imbalance ratio
    max / mean); None before the first forward, and where the latest was
    captured into a CUDA graph (its arrays are the graphs' shared scratch, and a
    replay runs no host code).
    """

    # Up to this many tokens (ep = 1) every expert runs on every token. Such a step reads every
    # expert's weights, which a decode batch of more than a few tokens touches anyway, and does
    # num_experts / top_k times the expert FLOPs: below about 190 tokens that stays under the
    # time of the weights' read on an H100 or H200 (FLOPs : bytes ~ 190 : 1 at bf16).
    dense_max_tokens = 128
    # Fewer (token, slot) pairs than experts: each pair's expert alone (where the ops run it)
    select_experts = True

    def __init__(self, backend: Backend, tp: TensorParallel, ep: ExpertParallel, router_weight,
                 experts: list[GatedMLP], top_k: int, renormalize: bool = True, shared: SharedExpert | None = None):
        self.backend, self.ops, self.xp = backend, backend.ops, backend.xp
        self.router_weight = router_weight  # [num_experts, hidden], replicated
        self.dispatch = ExpertDispatcher(backend, ep, router_weight.shape[0])
        if len(experts) != self.dispatch.placement.experts_per_rank:
            raise ValueError(f"SparseMoE: {len(experts)} experts given, this rank holds "
                             f"{self.dispatch.placement.experts_per_rank}")
        self.experts, self.top_k, self.renormalize, self.shared = experts, top_k, renormalize, shared
        # ep = 1 under tp: every expert holds a slice, so the partial outputs sum over tp
        self.reduce_tp = tp if ep.size == 1 and tp.size > 1 else None
        self._load: ExpertLoad | None = None
        self._device_ids = None   # the device paths' routing, counted when the load is read
        self._stacks = stack_experts(backend, experts) if ep.size == 1 else None   # (gate/up, down) or None

    @property
    def last_expert_load(self) -> ExpertLoad | None:
        if self._device_ids is None:
            return self._load
        num_experts = self.dispatch.placement.num_experts
        ids = np.asarray(self.backend.to_numpy(self._device_ids), dtype=np.int64).reshape(-1)
        return ExpertLoad(np.bincount(ids[(ids >= 0) & (ids < num_experts)], minlength=num_experts))   # NaN rows: none

    def __call__(self, x):
        # x [T, hidden], the same on every rank of the tp / ep group -> [T, hidden]
        share = self.dispatch.share(x)  # [n, hidden]: all of x when ep == 1
        weights, expert_ids = self._route(share)
        if self.dispatch.ep.size == 1 and 0 < share.shape[0] <= self.dense_max_tokens:
            run = self._run_selected if self._selects(share) else self._run_dense
            out, self._load = run(share, weights, expert_ids), None
            self._device_ids = None if self.ops.capturing() else expert_ids
        else:
            host_ids = self.backend.to_numpy(expert_ids)
            out, self._load = self.dispatch.exchange(share, weights, host_ids, self._run_experts)
            self._device_ids = None
        if self.shared is not None:
            self.shared.add_to(out, share)
        out = self.dispatch.gather(out, x.shape[0])
        return self.reduce_tp.comm.all_reduce(out) if self.reduce_tp is not None else out

    def _route(self, x):
        """x [n, hidden] -> (weights [n, k] float32, expert ids [n, k] int32), on the backend."""
        if x.shape[0] == 0:
            return self.xp.zeros((0, self.top_k), dtype=self.xp.float32), self.xp.zeros((0, self.top_k), self.xp.int32)
        logits = self.ops.linear(x, self.router_weight)  # [n, experts]
        return self.ops.topk_softmax(logits, self.top_k, self.renormalize)

    def _selects(self, x) -> bool:
        """Whether x's rows take _run_selected: fewer (token, slot) pairs than experts, the rows
        rounded up to a power of two as the decode graphs' buckets are (a padded step takes the
        path its rows would take eagerly)."""
        rows = 1 << (x.shape[0] - 1).bit_length()
        return bool(self.select_experts and self._stacks is not None and rows * self.top_k < len(self.experts)
                    and self.ops.expert_mlp_applies(x, *self._stacks))

    def _run_selected(self, x, weights, ids):
        """x [n, hidden] -> the experts' combined output [n, hidden]: each (token, slot) pair's
        expert on its token alone, added slot after slot."""
        num_rows = x.shape[0]
        pairs = ids.T.reshape(-1)   # [k * n]: slot s of token t at s * n + t
        gate_up, down = self._stacks
        y = self.ops.expert_linear(self.ops.expert_linear(x, gate_up, pairs, gated=True), down, pairs)
        out, rows = self.xp.zeros_like(x), self.xp.arange(num_rows, dtype=self.xp.int32)
        for slot in range(self.top_k):
            self.ops.scatter_add_rows(out, rows, y[slot * num_rows:(slot + 1) * num_rows], weights[:, slot])
        return out

    def _run_dense(self, x, weights, ids):
        """x [n, hidden] -> the experts' combined output [n, hidden]: every (local = all, ep = 1)
        expert on every row, added in scaled by the row's weight for it, expert after expert.
        Only device work of fixed shapes."""
        xp, num_rows = self.xp, x.shape[0]
        experts = xp.arange(len(self.experts), dtype=ids.dtype)[:, None]   # [experts, 1]
        scale = xp.zeros((len(self.experts), num_rows), dtype=xp.float32)   # [experts, n]
        for slot in range(ids.shape[1]):
            scale += xp.where(ids[:, slot] == experts, weights[:, slot], xp.float32(0))
        out, rows = xp.zeros_like(x), xp.arange(num_rows, dtype=xp.int32)
        for expert, expert_scale in zip(self.experts, scale):
            self.ops.scatter_add_rows(out, rows, expert(x), expert_scale)
        return out

    def _run_experts(self, rows, rows_per_expert):
        """rows [R, hidden] sorted by local expert -> each expert's output on its rows, same order."""
        outputs, start = [], 0
        for expert, count in zip(self.experts, rows_per_expert):
            if count:
                outputs.append(expert(rows[start:start + count]))
                start += count
        if not outputs:
            return rows
        return outputs[0] if len(outputs) == 1 else self.xp.concatenate(outputs)


def stack_experts(backend: Backend, experts: list[GatedMLP]):
    """(gate/up [E, 2 inter, hidden], down [E, hidden, inter]): the experts' weights in one array
    each, every expert's own now a view into it (no copy kept); None where one has a bias."""
    if not experts or any(e.gate_up_bias is not None or e.down.bias is not None for e in experts):
        return None
    stacks = tuple(backend.xp.stack(weights) for weights in ([e.gate_up_weight for e in experts],
                                                             [e.down.weight for e in experts]))
    for expert, gate_up, down in zip(experts, *stacks):
        expert.gate_up_weight, expert.down.weight = gate_up, down
    return stacks


def load_experts(backend: Backend, c: ModelConfig, w: WeightReader, tp: TensorParallel, ep: ExpertParallel,
                 prefix: str, inter: int) -> list[GatedMLP]:
    """This rank's experts `{prefix}.{e}`: all of them sliced over tp when
    ep == 1, else its num_experts / ep whole ones (only their bytes are read)."""
    placement = ExpertPlacement(c.num_experts, ep.size, ep.rank)
    split = tp if ep.size == 1 else TensorParallel()
    return [gated_mlp(backend, c, w, split, f"{prefix}.{e}", inter, reduce_tp=TensorParallel())
            for e in placement.local_experts]


class MoEForCausalLM(LlamaForCausalLM):
    """A Llama-family model with MoE MLPs; `ep` (keyword) spreads the
    experts over a group. Other arguments pass through to the Llama model."""

    dense_mlp = False   # the post-attention norm stays unfolded: its output feeds a router and experts

    @property
    def max_graph_rows(self) -> int:
        """Decode rows a CUDA graph can capture: more run the sorted experts, as does ep > 1,
        which read their counts on the host."""
        return SparseMoE.dense_max_tokens if self.ep.size == 1 else 0

    def __init__(self, backend: Backend, config: ModelConfig, w: WeightReader, tp: TensorParallel = TensorParallel(),
                 *args, ep: ExpertParallel = ExpertParallel(), **kwargs):
        check_expert_layout(config.num_experts, tp.size, ep.size)
        self.ep = ep  # build_mlp, called by the parent's constructor, reads it
        super().__init__(backend, config, w, tp, *args, **kwargs)

    def expert_loads(self) -> list[ExpertLoad | None]:
        """The latest forward's load metric of each MoE layer of this model (or stage)."""
        return [layer.mlp.last_expert_load for layer in self.layers if isinstance(layer.mlp, SparseMoE)]
