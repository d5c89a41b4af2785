"""The engine's side of disaggregated prefill (one engine, both roles).

On a prefill group, a request added with an export start token runs as an
ordinary one-token request; in the step that completes its prompt, before
its blocks can be freed, `take_exports` reads the prompt's KV from those
blocks (every rank's heads) into a `KVExport` that leaves with the
request's final output. On a decode group, `commit` writes pushed KV into
the blocks the Scheduler reserved and lets the request run on with the
first token the prefill group sampled.

It owns no blocks and no scheduling: the Scheduler reserves and commits,
the BlockManager owns the tables, the runner moves the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from shardline.worker.block_manager import BlockManager
from shardline.worker.scheduler import Scheduler
from shardline.worker.step_plan import StepPlan


@dataclass(frozen=True)
class KVExport:
    """Prompt tokens [start_token, start_token + k.shape[1]) of one request."""

    start_token: int
    k: np.ndarray                 # [num_layers, num_tokens, num_kv_heads, head_dim], storage dtype
    v: np.ndarray

    @property
    def num_bytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class KVHandoff:
    def __init__(self, scheduler: Scheduler, block_manager: BlockManager, runner: Any):
        self.scheduler, self.block_manager, self.runner = scheduler, block_manager, runner
        self._export_from: dict[str, int] = {}     # request id -> first prompt token to export
        self._exports: dict[str, KVExport] = {}    # read, waiting for the request's final output

    def want_export(self, request_id: str, start_token: int) -> None:
        self._export_from[request_id] = start_token

    def take_exports(self, plan: StepPlan) -> None:
        """Reads the KV of flagged requests whose prompt this plan completes (call before
        the scheduler sees the plan's output, which frees finished requests' blocks)."""
        for request_id, num_tokens in zip(plan.request_ids, plan.num_scheduled_tokens):
            start = self._export_from.get(request_id)
            request = self.scheduler.get_request(request_id)
            if start is None or request is None:
                continue
            if request.num_computed_tokens + int(num_tokens) >= request.num_prompt_tokens:
                slots = self.slots(request_id, start, request.num_prompt_tokens)
                k, v = self.runner.read_kv(slots, to_host=False)   # a KV link sends from the GPU
                self._exports[request_id] = KVExport(start, k, v)
                del self._export_from[request_id]

    def pop_export(self, request_id: str) -> KVExport | None:
        """The request's export once it has finished (forgets the request either way)."""
        self._export_from.pop(request_id, None)
        return self._exports.pop(request_id, None)

    def commit(self, request_id: str, start_token: int, k: np.ndarray, v: np.ndarray, first_token_id: int) -> None:
        """Writes prompt tokens [start_token, prompt end) of a reserved request, then runs it on.
        ValueError naming the field when they do not match the reservation."""
        request = self.scheduler.reserved_request(request_id)
        if request is None:
            raise KeyError(f"request_id: {request_id!r} holds no KV reservation (aborted or expired)")
        if start_token != request.num_computed_tokens or k.shape[1] != request.num_prompt_tokens - start_token:
            raise ValueError(f"start_token: the reservation expects prompt tokens [{request.num_computed_tokens}, "
                             f"{request.num_prompt_tokens}), got [{start_token}, {start_token + k.shape[1]})")
        self.runner.write_kv(self.slots(request_id, start_token, request.num_prompt_tokens), k, v)
        self.scheduler.commit_remote_kv(request_id, first_token_id)

    def slots(self, request_id: str, start: int, stop: int) -> np.ndarray:
        """Cache slots of the request's tokens [start, stop)."""
        size = self.block_manager.block_size_tokens
        table = np.asarray(self.block_manager.block_table(request_id), dtype=np.int64)
        positions = np.arange(start, stop, dtype=np.int64)
        return table[positions // size] * size + positions % size
