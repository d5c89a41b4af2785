"""Pipeline parallelism: where each rank sits and which layers each stage runs.

A group of tp × pp ranks: global rank r is pipeline stage r // tp and
tensor-parallel rank r % tp (`ParallelConfig.coordinates`). Layers are cut
into pp contiguous stages by parameter cost (the embedding counts for the
first stage, the LM head for the last) unless the config names the split
(`pp_layers`). `PipelineStage` is what a model needs to load its slice;
`StageLinks` is how a rank talks to its neighbouring stages.

Pure arithmetic plus the communicator handles: no arrays, no model code,
no environment reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from shardline.parallel.communicator import Communicator


class PipelineLayoutError(ValueError):
    """A pipeline layout the model cannot take; the message names the key."""


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    pp_layers: tuple[int, ...] | None = None  # layers per stage; None: split by parameter cost

    def __post_init__(self):
        if self.tp < 1 or self.pp < 1:
            raise PipelineLayoutError(f"tp ({self.tp}) and pp ({self.pp}) must be at least 1")
        if self.pp_layers is not None and len(self.pp_layers) != self.pp:
            raise PipelineLayoutError(f"pp_layers lists {len(self.pp_layers)} stages but pp = {self.pp}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def coordinates(self, rank: int) -> tuple[int, int]:
        """(pipeline stage, tensor-parallel rank) of global `rank`."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a group of tp * pp = {self.world_size}")
        return rank // self.tp, rank % self.tp

    def global_rank(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp + tp_rank


@dataclass(frozen=True)
class PipelineStage:
    """The layers [first_layer, stop_layer) of stage `index` of `num_stages`.
    The default (stop_layer None) is the whole model on one stage."""

    index: int = 0
    num_stages: int = 1
    first_layer: int = 0
    stop_layer: int | None = None

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def layer_range(self, num_layers: int) -> range:
        return range(self.first_layer, num_layers if self.stop_layer is None else self.stop_layer)


def layer_costs(config: Any) -> tuple[list[int], int, int]:
    """Parameters per decoder layer, of the embedding, and of the LM head
    (duck-typed on ModelConfig; tied heads count too: the last stage holds
    its own copy)."""
    c, h = config, config.hidden_size
    attention = h * (c.q_size + 2 * c.kv_size) + c.q_size * h
    mlp_matrices = 2 if c.activation != "silu" else 3
    mlp = mlp_matrices * h * c.intermediate_size * max(1, c.num_experts)
    embed = c.vocab_size * h
    return [attention + mlp] * c.num_layers, embed, embed


def split_by_cost(costs: Sequence[int], first_extra: int, last_extra: int, pp: int) -> list[int]:
    """Layers per stage, contiguous, at least one each, minimising the
    costliest stage (the embedding adds to the first, the head to the last)."""
    n = len(costs)
    if n < pp:
        raise PipelineLayoutError(f"pp ({pp}) exceeds the model's {n} layers")
    prefix = [0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)

    def stage_cost(stage: int, start: int, stop: int) -> int:
        extra = (first_extra if stage == 0 else 0) + (last_extra if stage == pp - 1 else 0)
        return prefix[stop] - prefix[start] + extra

    # best[s][k]: (max stage cost, cut points) of the first k layers over stages 0..s
    best = {(0, k): (stage_cost(0, 0, k), (k,)) for k in range(1, n - pp + 2)}
    for s in range(1, pp):
        for k in range(s + 1, n - (pp - 1 - s) + 1):
            best[s, k] = min((max(best[s - 1, j][0], stage_cost(s, j, k)), best[s - 1, j][1] + (k,))
                             for j in range(s, k))
    cuts = (0,) + best[pp - 1, n][1]
    return [cuts[i + 1] - cuts[i] for i in range(pp)]


@dataclass(frozen=True)
class StagePlacement:
    """Which stage of which layout a rank loads (the whole model by default)."""

    parallel: ParallelConfig = ParallelConfig()
    stage_index: int = 0


def resolve_stage(config: Any, placement: StagePlacement) -> PipelineStage:
    """This stage's layers for a model of `config` (checks the layout)."""
    parallel, stage_index = placement.parallel, placement.stage_index
    num_layers, pp = config.num_layers, parallel.pp
    if num_layers < pp:
        raise PipelineLayoutError(f"pp ({pp}) exceeds the model's {num_layers} layers")
    if parallel.pp_layers is None:
        counts = split_by_cost(*layer_costs(config), pp) if pp > 1 else [num_layers]
    else:
        counts = list(parallel.pp_layers)
        if sum(counts) != num_layers or min(counts) < 1:
            raise PipelineLayoutError(f"pp_layers {counts} must be {pp} positive counts summing to the "
                                      f"model's {num_layers} layers")
    first = sum(counts[:stage_index])
    return PipelineStage(stage_index, pp, first, first + counts[stage_index])


@dataclass(frozen=True)
class StageLinks:
    """Point-to-point channels of one rank across stages.

    `link` joins the ranks of equal tp rank over all stages (its rank i is
    stage i): activations go stage i -> i + 1 on it (NCCL on GPU, MPI on
    CPU). `control` is the group's MPI world: the last stage's tp rank 0
    (global rank `token_source_rank`) returns sampled tokens to the leader
    (global rank 0) on it as host arrays. Both None on a single stage."""

    stage: int = 0
    num_stages: int = 1
    tp_rank: int = 0
    link: Communicator | None = None
    control: Any = None
    token_source_rank: int = 0

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    @property
    def returns_tokens(self) -> bool:
        """This rank samples and sends the step's tokens to the leader."""
        return self.is_last and self.tp_rank == 0

    @property
    def is_leader(self) -> bool:
        return self.is_first and self.tp_rank == 0

    def send_next(self, x: Any) -> None:
        self.link.send(x, self.stage + 1)

    def send_stream(self, x: Any, residual: Any) -> None:
        """The residual stream x + residual to the next stage, always as two arrays: a stream
        held in x alone (residual None, models/layers.py's PreNormBlock) goes as zeros and x."""
        if residual is None:
            x, residual = np.zeros_like(x), x
        self.send_next(x)
        self.send_next(residual)

    def recv_prev(self, like: Any) -> Any:
        return self.link.recv(like, self.stage - 1)
