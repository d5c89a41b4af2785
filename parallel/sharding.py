"""How a tensor-parallel group splits a model: pure arithmetic, no arrays.

Attention heads: query heads split evenly over tp ranks; KV heads split
evenly when tp <= num_kv_heads, else each KV head is replicated on
tp / num_kv_heads consecutive ranks (the query heads of those ranks all
use it). Vocabulary: ceil(vocab / tp) rows per rank, the last rank padded,
so every rank's logits have the same width for all_gather.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from shardline.parallel.communicator import Communicator, SingleRank


def even_range(total: int, parts: int, index: int, what: str) -> tuple[int, int]:
    if total % parts:
        raise ValueError(f"{what} ({total}) must be divisible by tp ({parts})")
    size = total // parts
    return index * size, (index + 1) * size


@dataclass(frozen=True)
class HeadSplit:
    q_heads: tuple[int, int]    # [start, stop) of this rank's query heads
    kv_heads: tuple[int, int]   # [start, stop) of this rank's KV heads

    @property
    def num_q_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]


def split_heads(num_heads: int, num_kv_heads: int, tp: int, rank: int) -> HeadSplit:
    q = even_range(num_heads, tp, rank, "num_attention_heads")
    if tp <= num_kv_heads:
        return HeadSplit(q, even_range(num_kv_heads, tp, rank, "num_key_value_heads"))
    if tp % num_kv_heads:
        raise ValueError(f"tp ({tp}) must be a multiple of num_key_value_heads ({num_kv_heads}) "
                         f"to replicate KV heads")
    kv = rank // (tp // num_kv_heads)
    return HeadSplit(q, (kv, kv + 1))


def vocab_range(vocab_size: int, tp: int, rank: int) -> tuple[int, int, int]:
    """(start, stop, padded rows per rank): rows [start, stop) are real."""
    per_rank = -(-vocab_size // tp)
    start = min(rank * per_rank, vocab_size)
    return start, min(start + per_rank, vocab_size), per_rank


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in its tensor-parallel group and the group's communicator."""

    comm: Communicator = SingleRank()

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size


def kv_head_range(config: Any, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """[start, stop) of the KV heads a tensor-parallel rank holds."""
    return split_heads(config.num_heads, config.num_kv_heads, tp_size, tp_rank).kv_heads


def join_kv_heads(parts: list[np.ndarray], config: Any) -> np.ndarray:
    """Every tp rank's [..., heads of the rank, head_dim] -> [..., all KV heads, head_dim]
    (where ranks replicate a head, any copy: they are equal)."""
    full = np.empty((*parts[0].shape[:-2], config.num_kv_heads, parts[0].shape[-1]), dtype=parts[0].dtype)
    for rank, part in enumerate(parts):
        start, stop = kv_head_range(config, len(parts), rank)
        full[..., start:stop, :] = part
    return full
