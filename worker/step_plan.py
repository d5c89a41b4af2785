"""`StepPlan`: everything the ranks of an engine group need to run one step.

The scheduler (on the group leader) builds it; every rank's ModelRunner
executes it. It is flat NumPy arrays plus request ids, and serialises to
bytes (`np.savez`, no pickle) for the group broadcast. It holds no Python
objects that only the leader has (no Request, no BlockManager).

Shapes: B scheduled requests, T scheduled tokens (sum over requests),
S requests that sample a token this step (those whose scheduled tokens
reach the end of their known sequence, or decode ahead), C copy-on-write
block copies.

Decode ahead (the host plans step n+1 while the GPU runs step n): a request
still decoding in the plan before this one may take its next token here
before that token is known; `token_sources` then names the row of the
previous plan's sampled tokens (on the device) that fills its token.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, fields

import numpy as np


@dataclass(frozen=True)
class SamplingBatch:
    """One row per sampling request (S rows), in the order of `sample_rows`."""

    temperature: np.ndarray         # [S] float32, 0 = greedy
    top_k: np.ndarray               # [S] int32, 0 = off
    top_p: np.ndarray               # [S] float32, 1 = off
    min_p: np.ndarray               # [S] float32, 0 = off
    seeds: np.ndarray               # [S] uint64
    offsets: np.ndarray             # [S] int64: index of the output token being sampled
    repetition_penalty: np.ndarray  # [S] float32, 1 = off
    presence_penalty: np.ndarray    # [S] float32, 0 = off
    frequency_penalty: np.ndarray   # [S] float32, 0 = off
    # Token history for penalties, padded with 0 past the lengths; width 0
    # when no row of the batch uses a penalty.
    prompt_ids: np.ndarray          # [S, P] int32
    prompt_lens: np.ndarray         # [S] int32
    output_ids: np.ndarray          # [S, O] int32
    output_lens: np.ndarray         # [S] int32
    num_logprobs: np.ndarray        # [S] int32, 0 = none


@dataclass(frozen=True)
class StepPlan:
    step_id: int
    request_ids: tuple[str, ...]      # [B] in batch order
    num_scheduled_tokens: np.ndarray  # [B] int32
    token_ids: np.ndarray             # [T] int32, requests' tokens back to back
    positions: np.ndarray             # [T] int32, position of each token in its sequence
    slot_mapping: np.ndarray          # [T] int64, block_id * block_size_tokens + offset for its K/V
    query_start_loc: np.ndarray       # [B + 1] int32, request b's tokens are [qsl[b], qsl[b+1])
    seq_lens: np.ndarray              # [B] int32, tokens in KV for request b once this step ran
    block_tables: np.ndarray          # [B, max_blocks] int32, padded with 0 past ceil(seq_len / block)
    sample_rows: np.ndarray           # [S] int32, rows of token_ids whose logits are sampled
    sample_request_index: np.ndarray  # [S] int32, index into request_ids
    sampling: SamplingBatch
    block_copies: np.ndarray          # [C, 2] int32 (src, dst), done before the forward
    token_sources: np.ndarray         # [T] int32, -1: token_ids holds it; else the previous plan's sample row

    @property
    def takes_pending_tokens(self) -> bool:
        return bool((self.token_sources >= 0).any())

    @property
    def one_query_each(self) -> bool:
        """Every request has one token this step (a decode step): query_start_loc is 0, 1, ..., B."""
        return bool(self.num_scheduled_tokens.size) and bool((self.num_scheduled_tokens == 1).all())

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def to_bytes(self) -> bytes:
        arrays = {f"s.{f.name}": getattr(self.sampling, f.name) for f in fields(SamplingBatch)}
        for f in fields(StepPlan):
            if f.name not in ("sampling", "request_ids", "step_id"):
                arrays[f.name] = getattr(self, f.name)
        arrays["step_id"] = np.asarray(self.step_id, dtype=np.int64)
        arrays["request_ids"] = np.asarray(self.request_ids, dtype=np.str_)
        buffer = io.BytesIO()
        np.savez(buffer, allow_pickle=False, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "StepPlan":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            sampling = SamplingBatch(**{f.name: z[f"s.{f.name}"] for f in fields(SamplingBatch)})
            values = {f.name: z[f.name] for f in fields(cls)
                      if f.name not in ("sampling", "request_ids", "step_id")}
            return cls(step_id=int(z["step_id"]), request_ids=tuple(str(r) for r in z["request_ids"]),
                       sampling=sampling, **values)
