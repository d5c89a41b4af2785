"""The engine's side of disaggregated prefill (one engine, both roles).

On a prefill group, a request added with an export start token runs as an
ordinary one-token request. After every step that computes part of its
prompt (chunked prefill cuts a long one over several steps), before its
blocks can be freed, `take_exports` reads the KV of the prompt tokens that
became ready (every rank's heads, from the export start on, prefix-cache
hits included) into a `KVExport` piece that leaves with that step's output,
so the service sends piece i while the engine computes piece i + 1. On a decode group, `commit` writes pushed KV into
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
        self._export_from: dict[str, int] = {}     # request id -> next prompt token to export
        self._pieces: dict[str, KVExport] = {}     # read this step, leaving with its output

    def want_export(self, request_id: str, start_token: int) -> None:
        self._export_from[request_id] = start_token

    def take_exports(self, plan: StepPlan) -> None:
        """Reads the KV of the prompt tokens this plan makes ready for flagged requests
        (call before the scheduler sees the plan's output, which frees finished requests' blocks)."""
        if not self._export_from:   # the common step: no request exports (every step, every row)
            return
        for request_id, num_tokens in zip(plan.request_ids, plan.num_scheduled_tokens):
            start = self._export_from.get(request_id)
            request = self.scheduler.get_request(request_id)
            if start is None or request is None:
                continue
            end = min(request.num_computed_tokens + int(num_tokens), request.num_prompt_tokens)
            if end <= start:
                continue
            k, v = self.runner.read_kv(self.slots(request_id, start, end), to_host=False)  # a link sends from the GPU
            self._pieces[request_id] = KVExport(start, k, v)
            if end == request.num_prompt_tokens:
                del self._export_from[request_id]
            else:
                self._export_from[request_id] = end

    def pop_piece(self, request_id: str) -> KVExport | None:
        return self._pieces.pop(request_id, None)

    def waiting_pieces(self) -> list[str]:
        """Requests with a piece read this step."""
        return list(self._pieces)

    def forget(self, request_id: str) -> None:
        self._export_from.pop(request_id, None)
        self._pieces.pop(request_id, None)

    def commit(self, request_id: str, start_token: int, k, v, first_token_id: int) -> None:
        """Writes prompt tokens [start_token, prompt end) of a reserved request, then runs it on.
        `k`, `v`: arrays [layers, tokens, heads, head_dim], or lists of such pieces in token
        order. ValueError naming the field when they do not match the reservation."""
        request = self.scheduler.reserved_request(request_id)
        if request is None:
            raise KeyError(f"request_id: {request_id!r} holds no KV reservation (aborted or expired)")
        k_pieces, v_pieces = (k, v) if isinstance(k, list) else ([k], [v])
        num_tokens = sum(piece.shape[1] for piece in k_pieces)
        if start_token != request.num_computed_tokens or num_tokens != request.num_prompt_tokens - start_token:
            raise ValueError(f"start_token: the reservation expects prompt tokens [{request.num_computed_tokens}, "
                             f"{request.num_prompt_tokens}), got [{start_token}, {start_token + num_tokens})")
        at = start_token
        for k_piece, v_piece in zip(k_pieces, v_pieces):
            stop = at + k_piece.shape[1]
            self.runner.write_kv(self.slots(request_id, at, stop), k_piece, v_piece)
            at = stop
        self.scheduler.commit_remote_kv(request_id, first_token_id)

    def slots(self, request_id: str, start: int, stop: int) -> np.ndarray:
        """Cache slots of the request's tokens [start, stop)."""
        size = self.block_manager.block_size_tokens
        table = np.asarray(self.block_manager.block_table(request_id), dtype=np.int64)
        positions = np.arange(start, stop, dtype=np.int64)
        return table[positions // size] * size + positions % size
