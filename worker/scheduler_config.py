"""`SchedulerConfig`: the limits and policy the in-flight batching scheduler
(scheduler.py) works under, checked when made. Pure Python, no imports of
the scheduler's state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int   # token budget of one step (prefill chunks + decodes)
    max_num_seqs: int             # running requests at most
    max_model_len: int            # prompt + output tokens of one request at most
    block_size_tokens: int
    policy: Literal["fcfs", "priority"] = "fcfs"
    # Plans scheduled before the oldest one's tokens are back (pipeline
    # parallelism keeps one per stage busy); a request is in one plan at most.
    max_plans_in_flight: int = 1
    # Decode ahead (needs max_plans_in_flight 2): the host plans step n+1 while step n runs,
    # its requests taking their next chunk or token (from step n's output, on the device).
    decode_ahead: bool = False

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len", "block_size_tokens",
                     "max_plans_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy must be 'fcfs' or 'priority', got {self.policy!r}")
        if self.decode_ahead and self.max_plans_in_flight != 2:
            raise ValueError(f"decode_ahead needs max_plans_in_flight 2, got {self.max_plans_in_flight}")
