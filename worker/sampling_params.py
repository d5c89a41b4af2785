"""Per-request sampling settings, validated at the boundary.

A bad value raises `ValueError` whose message starts with the field name,
so the CLI and (later) the gRPC API can report it as-is. This module holds
settings only: it must not sample, tokenize or know about batches.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
MAX_ABS_PENALTY = 2.0


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0      # 0 means greedy
    top_k: int = 0                # 0 means all tokens
    top_p: float = 1.0            # 1 means no nucleus cut
    min_p: float = 0.0            # 0 means off; else drop tokens below min_p * max prob
    repetition_penalty: float = 1.0   # 1 means off
    presence_penalty: float = 0.0     # 0 means off
    frequency_penalty: float = 0.0    # 0 means off
    seed: int = field(default_factory=lambda: secrets.randbits(63))
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()             # stop strings, found by the engine's detokenizer
    stop_token_ids: tuple[int, ...] = ()   # stop whatever ignore_eos says
    logprobs: int = 0                      # top-n log-probabilities per token, 0 means none

    def __post_init__(self) -> None:
        # Lists are accepted for convenience; tuples keep the params hashable and frozen.
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop  # one string, as in OpenAI's API
        object.__setattr__(self, "stop", tuple(stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self._check_lengths_and_seed()
        self._check_filters()
        self._check_penalties()
        self._check_stops()

    def _check_lengths_and_seed(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}] (0 disables it), got {self.logprobs}")

    def _check_filters(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 disables it), got {self.min_p}")

    def _check_penalties(self) -> None:
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -MAX_ABS_PENALTY <= value <= MAX_ABS_PENALTY:
                raise ValueError(f"{name} must be in [-2, 2] (0 disables it), got {value}")

    def _check_stops(self) -> None:
        for text in self.stop:
            if not isinstance(text, str) or not text:
                raise ValueError(f"stop must hold non-empty strings, got {text!r}")
        for token_id in self.stop_token_ids:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise ValueError(f"stop_token_ids must hold token ids >= 0, got {token_id!r}")

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)
