"""One generation request as the engine core tracks it: counters plus a status.

Prefill and decode are not separate states. Tokens [0, num_computed_tokens)
have K/V in the cache; a step may compute up to `num_tokens_to_compute`
more, and the request samples when the step reaches its last known token.
After prefill (and after each sampled token) exactly one token is left to
compute, so a "decode" is just a step that schedules that one token.

This module must not allocate blocks or decide scheduling: the BlockManager
owns block tables and the Scheduler owns status transitions.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from shardline.worker.sampling_params import SamplingParams


class CheckedTokens(tuple):
    """Token ids token_ids() has checked (Python ints in range): a Request takes them as they are,
    where it would otherwise convert and check each one again (a tenth of a millisecond at 2k)."""

    __slots__ = ()


def token_ids(values: Sequence[int], name: str, vocab_size: int) -> list[int]:
    """`values` as a list of ints in [0, vocab_size), else a ValueError naming `name`. Integer
    arrays and lists are checked in one NumPy pass (a long prompt's per-token Python loop took
    most of a millisecond); anything else goes through int() a value."""
    arr = np.asarray(values)
    if arr.ndim == 1 and np.issubdtype(arr.dtype, np.integer):
        ids = arr.tolist()
        bad = arr.size > 0 and (int(arr.min()) < 0 or int(arr.max()) >= vocab_size)
    else:
        ids = [int(t) for t in values]
        bad = any(not 0 <= t < vocab_size for t in ids)
    if bad:
        raise ValueError(f"{name} token ids must be in [0, {vocab_size})")
    return ids


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"                   # lost its blocks; waits to recompute
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"  # a prefill group is pushing its KV
    FINISHED_STOPPED = "finished_stopped"     # EOS, a stop token or a stop string
    FINISHED_LENGTH = "finished_length"       # max_tokens or max_model_len reached
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_ERROR = "finished_error"

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        """The API's word for a finished status ("stop", "length", "abort", "error")."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0                       # lower is served first under the "priority" policy
    eos_token_ids: frozenset[int] = frozenset()
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0            # tokens whose K/V are in the cache
    num_cached_tokens: int = 0              # prefix-cache hit when first scheduled
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None        # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None    # the stop string or stop token id that ended it
    error: str | None = None
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"request_id must be a non-empty string, got {self.request_id!r}")
        checked = isinstance(self.prompt_token_ids, CheckedTokens)
        if not checked:
            self.prompt_token_ids = tuple(map(int, self.prompt_token_ids))
        self.eos_token_ids = frozenset(int(t) for t in self.eos_token_ids)
        if not self.prompt_token_ids:
            raise ValueError("prompt_token_ids must hold at least one token")
        if not checked and min(self.prompt_token_ids) < 0:
            raise ValueError(f"prompt_token_ids must be >= 0, got {min(self.prompt_token_ids)}")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_to_compute(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_tokens - 1

    @property
    def all_token_ids(self) -> list[int]:
        return [*self.prompt_token_ids, *self.output_token_ids]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def tokens(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole list (hot path)."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return list(self.prompt_token_ids[start:end])
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt:end - num_prompt]
        return [*self.prompt_token_ids[start:], *self.output_token_ids[:end - num_prompt]]

    def finish(self, status: RequestStatus, stop_reason: str | int | None = None,
               error: str | None = None) -> None:
        if not status.is_finished:
            raise ValueError(f"status must be a finished status, got {status}")
        self.status, self.finish_reason = status, status.finish_reason
        self.stop_reason, self.error = stop_reason, error

