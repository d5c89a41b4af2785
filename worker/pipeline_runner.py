"""Runs one pipeline stage of a `StepPlan` on this rank.

Stage 0 embeds the plan's tokens; every stage runs its layers over its own
paged KV cache (its layers only) and sends hidden states and residuals,
[num_tokens, hidden] each, to the next stage; the last stage takes the
final norm and the logits, and its tp rank 0 samples and returns the
tokens (and log-probabilities when asked) to the leader over MPI as host
arrays. Every rank knows every shape from the plan, which all ranks get.

One plan is in flight at a time: `execute` returns once the plan's tokens
are back on the leader. It schedules nothing and owns no KV blocks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shardline.parallel.pipeline import StageLinks
from shardline.worker.model_runner import ModelRunner, StepResult, upload_step_inputs
from shardline.worker.step_plan import StepPlan

TOKENS_TAG, LOGPROBS_TAG = 71, 72


class PipelineRunner:
    def __init__(self, runner: ModelRunner, links: StageLinks):
        self.runner, self.links = runner, links
        self.model, self.backend, self.kv = runner.model, runner.backend, runner.kv

    def execute(self, plan: StepPlan, sample: bool = True) -> StepResult:
        """`sample` is ignored: the last stage's tp rank 0 always samples,
        since the leader needs its tokens; other ranks return none."""
        result = self.submit(plan)
        return self.collect(plan) if result is None else result

    def collect(self, plan: StepPlan) -> StepResult:
        """The leader (stage 0 of several): the plan's tokens from the last stage."""
        return receive_result(self.links, plan)

    def submit(self, plan: StepPlan) -> StepResult | None:
        """Runs this stage's part and passes the activations on. None on the
        leader of a multi-stage pipeline: its tokens come later (`collect`),
        so it can start the next micro-batch meanwhile."""
        links = self.links
        inputs = upload_step_inputs(self.backend, plan)
        ctx = self.runner.begin_step(plan, inputs)
        positions = inputs["positions"]
        x, residual = self._stage_input(plan, inputs["token_ids"], positions)
        x, residual = self.model.run_layers(x, residual, positions, ctx)  # [num_tokens, hidden] each
        if not links.is_last:
            links.send_stream(x, residual)
            return None if links.is_leader else _empty()
        hidden = self.model.final_norm(x, residual)
        result = self.runner.finish_step(plan, hidden, links.returns_tokens, inputs)
        if links.returns_tokens and not links.is_leader:
            send_result(links, plan, result)
        return result

    def _stage_input(self, plan: StepPlan, token_ids: Any, positions: Any) -> tuple[Any, Any]:
        if self.links.is_first:
            return self.model.embed_tokens(token_ids, positions), None
        like = self.backend.zeros((plan.num_tokens, self.model.config.hidden_size))
        x = self.links.recv_prev(like)
        return x, self.links.recv_prev(like)


def _empty() -> StepResult:
    return StepResult(np.zeros(0, dtype=np.int32))


def _max_logprobs(plan: StepPlan) -> int:
    counts = plan.sampling.num_logprobs
    return int(counts.max()) if counts.size else 0


def send_result(links: StageLinks, plan: StepPlan, result: StepResult) -> None:
    """Last stage -> leader: tokens [S] int32, then (if the plan asks for
    log-probabilities) one float64 table [S, 1 + 2 * (K + 1)]: per row the
    number of entries, then that many token ids, then their log-probs."""
    if plan.sample_rows.size == 0:
        return
    links.control.Send(np.ascontiguousarray(result.sampled_token_ids, dtype=np.int32), dest=0, tag=TOKENS_TAG)
    width = _max_logprobs(plan) + 1
    if width == 1:
        return
    table = np.zeros((plan.sample_rows.size, 1 + 2 * width), dtype=np.float64)
    for row, entry in enumerate(result.logprobs):
        if entry:
            table[row, 0] = len(entry)
            table[row, 1:1 + len(entry)] = list(entry.keys())
            table[row, 1 + width:1 + width + len(entry)] = list(entry.values())
    links.control.Send(table, dest=0, tag=LOGPROBS_TAG)


def receive_result(links: StageLinks, plan: StepPlan) -> StepResult:
    """The leader's side of `send_result`."""
    num_rows = int(plan.sample_rows.size)
    if num_rows == 0:
        return _empty()
    tokens = np.empty(num_rows, dtype=np.int32)
    links.control.Recv(tokens, source=links.token_source_rank, tag=TOKENS_TAG)
    width = _max_logprobs(plan) + 1
    if width == 1:
        return StepResult(tokens)
    table = np.empty((num_rows, 1 + 2 * width), dtype=np.float64)
    links.control.Recv(table, source=links.token_source_rank, tag=LOGPROBS_TAG)
    logprobs = []
    for row, n in zip(table, plan.sampling.num_logprobs):
        count = int(row[0])
        ids, values = row[1:1 + count].astype(np.int64), row[1 + width:1 + width + count]
        logprobs.append({int(t): float(v) for t, v in zip(ids, values)} if n else None)
    return StepResult(tokens, tuple(logprobs))


def make_runner(model: Any, num_blocks: int, block_size_tokens: int, links: StageLinks = StageLinks()):
    """The ModelRunner of a single-stage rank, or this rank's PipelineRunner."""
    runner = ModelRunner(model, num_blocks, block_size_tokens)
    return runner if links.num_stages == 1 else PipelineRunner(runner, links)
