"""`LLMEngine`: in-flight batching over one model replica on this process.

Ties the pieces together: the tokenizer turns prompts into ids, the
Scheduler (with its BlockManager) plans each step, the ModelRunner
executes it, and per-request detokenizers stream text and catch stop
strings. `generate` is the offline API. It owns no scheduling policy and
no kernels itself.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from shardline.parallel.pipeline import StageLinks
from shardline.worker.block_manager import BlockManager
from shardline.worker.detokenizer import IncrementalDetokenizer
from shardline.worker.engine_config import EngineConfig
from shardline.worker.group import BroadcastingRunner, GroupContext, agree_on_blocks
from shardline.worker.kv_handoff import KVExport, KVHandoff
from shardline.worker.model_runner import ModelRunner, kv_bytes_per_block
from shardline.worker.offline import LocalModel, load_local
from shardline.worker.pipeline_runner import make_runner
from shardline.worker.request import CheckedTokens, Request, RequestStatus, token_ids
from shardline.worker.sampling_params import SamplingParams
from shardline.worker.scheduler import RequestOutput, Scheduler
from shardline.worker.scheduler_config import SchedulerConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)   # slots: one is made per request per step
class EngineOutput:
    request_id: str
    new_token_ids: list[int]
    text: str                        # text delta for the new tokens
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    logprobs: list[dict[int, float]] = field(default_factory=list)
    kv_export: KVExport | None = None   # export requests: the prompt KV this step made ready


@dataclass(frozen=True)
class Completion:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    error: str | None = None


def max_model_len_for(config: EngineConfig, model_config: Any) -> int:
    return min(config.max_model_len or model_config.max_position_embeddings, model_config.max_position_embeddings)


def graphs_apply(config: EngineConfig, runner: Any, grouped: bool) -> bool:
    """CUDA graphs for decode steps: a CUDA rank whose runner is a single stage's
    ModelRunner; in a tensor-parallel group (`grouped`) only with tp_cuda_graphs, every
    rank then capturing the same steps, their NCCL collectives inside the graphs;
    pipeline stages run eagerly."""
    return (config.cuda_graphs and isinstance(runner, ModelRunner) and runner.backend.name == "cuda"
            and (not grouped or config.tp_cuda_graphs))


def runner_for(config: EngineConfig, model: Any, num_blocks: int, links: StageLinks, grouped: bool) -> Any:
    """A rank's runner over num_blocks KV blocks, with CUDA graphs where they apply, every
    bucket's captured now with cuda_graphs_at_start. The leader's engine and each follower
    build theirs so, capturing the same buckets in the same order (their collectives match)."""
    runner = make_runner(model, num_blocks, config.block_size_tokens, links)
    if graphs_apply(config, runner, grouped):
        runner.enable_cuda_graphs(config.max_num_seqs, max_model_len_for(config, model.config),
                                  config.cuda_graphs_at_start)
    return runner


def follower_runner(config: EngineConfig, local: LocalModel, group: GroupContext) -> Any:
    """A non-leader rank's runner: the KV pool agreed with the group (num_blocks_for, as the
    leader's engine does), then runner_for. `config` must be the leader's: the buckets and
    whether to capture them at start come from it."""
    return runner_for(config, local.model, num_blocks_for(config, local, group), group.links, grouped=True)


def num_blocks_for(config: EngineConfig, local: LocalModel, group: GroupContext | None = None) -> int:
    """KV blocks of this rank's pool: set, or sized from free memory; in a group, the smallest
    any rank can hold (every rank allocates the same pool)."""
    if group is not None:
        return agree_on_blocks(group, num_blocks_for(config, local))
    if config.num_kv_blocks:
        return config.num_kv_blocks
    backend = local.model.backend
    per_block = kv_bytes_per_block(local.model, config.block_size_tokens)
    free = backend.free_device_bytes()
    budget = int(free * config.gpu_memory_fraction) if free is not None else config.cpu_kv_cache_bytes
    return max(1, budget // per_block)


class LLMEngine:
    """`group`: this engine is the leader of a multi-rank group (tensor and
    pipeline parallel); `local` then holds the leader's shard, and every
    step is broadcast to the followers (worker/group.py) before it runs here."""

    def __init__(self, config: EngineConfig, local: LocalModel | None = None, group: GroupContext | None = None):
        self.config = config
        self.local = local or load_local(config.model, config.backend, config.dtype)
        self.tokenizer = self.local.tokenizer
        model_config = self.local.model.config
        self.max_model_len = max_model_len_for(config, model_config)
        self.num_kv_blocks = num_blocks_for(config, self.local, group)
        self.block_manager = BlockManager(self.num_kv_blocks, config.block_size_tokens,
                                          config.enable_prefix_caching)
        # One micro-batch per pipeline stage in flight, so no stage idles; decoding ahead, two.
        ahead = config.decode_ahead if config.decode_ahead is not None else self.local.model.backend.name == "cuda"
        self.decode_ahead = ahead and group is None
        if config.decode_ahead and group is not None:
            log.warning("engine.decode_ahead is for single-rank engines: this group decodes one step at a time")
        self.max_plans_in_flight = group.links.num_stages if group is not None else 1 + self.decode_ahead
        self._in_flight: collections.deque = collections.deque()  # (plan, result or None), oldest first
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_batched_tokens=config.max_num_batched_tokens, max_num_seqs=config.max_num_seqs,
            max_model_len=self.max_model_len, block_size_tokens=config.block_size_tokens,
            policy=config.scheduling_policy, max_plans_in_flight=self.max_plans_in_flight,
            decode_ahead=self.decode_ahead), self.block_manager)
        self.runner = runner_for(config, self.local.model, self.num_kv_blocks,   # followers: follower_runner
                                 group.links if group is not None else StageLinks(), grouped=group is not None)
        if group is not None:
            self.runner = BroadcastingRunner(group, self.runner)
        tokenizer_eos = self.tokenizer.eos_token_ids if self.tokenizer else frozenset()
        self.eos_token_ids = frozenset(tokenizer_eos) | set(model_config.eos_token_ids)
        self._detokenizers: dict[str, IncrementalDetokenizer | None] = {}  # live requests
        self._ids = itertools.count()
        self.handoff = KVHandoff(self.scheduler, self.block_manager, self.runner)
        self._pending_logprobs: dict[str, list] = {}   # first tokens' log-probabilities from prefill groups

    def add_request(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams,
                    priority: int = 0, output_token_ids: Sequence[int] = (),
                    kv_export_from: int | None = None) -> None:
        """A prompt as text (tokenized here, no chat template) or as token ids.

        `output_token_ids`: tokens already streamed by another group (a resumed
        request); generation continues after them and they count toward max_tokens.
        `kv_export_from`: a prefill group's request; its outputs carry the KV of
        prompt tokens from there on, a piece per step that computed some
        (`EngineOutput.kv_export`; steps with no token give outputs with none).
        """
        request = self._new_request(request_id, prompt, params, priority, output_token_ids)
        if kv_export_from is not None:
            if self.max_plans_in_flight > 1:
                raise ValueError("kv_export_from: KV export needs a single-stage group (pp = 1) "
                                 "without decode_ahead")
            self.handoff.want_export(request_id, kv_export_from)
        self._queue(request)

    def reserve_remote_kv(self, request_id: str, prompt: Sequence[int], params: SamplingParams,
                          priority: int = 0) -> int | None:
        """A decode group's request whose prompt KV a prefill group will push
        (`commit_remote_kv`): blocks are reserved now. Returns the leading prompt
        tokens this engine caches (they are not pushed); None when it could not
        reserve and added the request as an ordinary one instead."""
        request = self._new_request(request_id, prompt, params, priority, ())
        deadline_s = time.monotonic() + self.config.remote_kv_timeout_s
        if self.max_plans_in_flight == 1 and self.scheduler.reserve_for_remote_kv(request, deadline_s):
            self._watch(request)
            return request.num_computed_tokens
        self._queue(request)
        return None

    def commit_remote_kv(self, request_id: str, start_token: int, k, v, first_token_id: int,
                         first_logprobs: dict[int, float] | None = None) -> None:
        """The pushed KV of prompt tokens [start_token, end) in storage dtype, all KV heads."""
        self.handoff.commit(request_id, start_token, k, v, first_token_id)
        if first_logprobs is not None:
            self._pending_logprobs[request_id] = [first_logprobs]

    def _new_request(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams,
                     priority: int, output_token_ids: Sequence[int]) -> Request:
        if request_id in self._detokenizers:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if self.tokenizer is None and (isinstance(prompt, str) or params.stop):
            raise ValueError("prompt: this engine has no tokenizer; pass token ids and no stop strings")
        vocab_size = self.local.model.config.vocab_size
        ids = token_ids(self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt, "prompt", vocab_size)
        if not ids:
            raise ValueError("prompt must hold at least one token")
        outputs = token_ids(output_token_ids, "output_token_ids", vocab_size)
        return Request(request_id=request_id, prompt_token_ids=CheckedTokens(ids), params=params,
                       arrival_time=time.monotonic(), priority=priority, eos_token_ids=self.eos_token_ids,
                       output_token_ids=outputs)

    def _queue(self, request: Request) -> None:
        self.scheduler.add_request(request)
        self._watch(request)

    def _watch(self, request: Request) -> None:
        """Its detokenizer, fed the output tokens it already has."""
        request_id = request.request_id
        detok = IncrementalDetokenizer(self.tokenizer, request.params.stop) if self.tokenizer else None
        stop = None   # the client has the output tokens' text; later deltas decode after it
        for token in request.output_token_ids if detok else ():
            stop = stop or detok.push(token).stop
        self._detokenizers[request_id] = detok
        if stop is not None:   # the streamed text already holds a stop string: nothing more to say
            self.scheduler.finish_request(request_id, RequestStatus.FINISHED_STOPPED, stop)

    def _pipelined_step(self):
        while len(self._in_flight) < self.max_plans_in_flight:
            plan = self.scheduler.schedule()
            if plan is None:
                break
            self._in_flight.append((plan, self.runner.submit(plan)))
        if not self._in_flight:
            return None, None
        plan, result = self._in_flight.popleft()
        return plan, result if result is not None else self.runner.collect(plan)

    def _ahead_step(self):
        """Decode ahead: the plan after the oldest one in flight is scheduled and queued
        (its pending tokens read on the device from the oldest one's) before the oldest
        one's tokens are waited for, so the GPU goes from one step to the next."""
        if not self._in_flight:
            plan = self.scheduler.schedule()
            if plan is None:
                return None, None
            self._in_flight.append((plan, self.runner.launch(plan, defer=True)))
        if len(self._in_flight) == 1:
            following = self.scheduler.schedule()
            if following is not None:
                launched = self.runner.launch(following, self._in_flight[0][1], defer=True)
                self._in_flight.append((following, launched))
        plan, launched = self._in_flight.popleft()
        return plan, launched.result()

    def shutdown(self) -> None:
        """Releases the group's followers (a no-op for a single rank), after
        taking the tokens of micro-batches still in the pipe."""
        while self._in_flight:
            plan, result = self._in_flight.popleft()
            if result is None:
                self.runner.collect(plan)
            elif self.decode_ahead:
                result.result()   # its copy to pinned host memory is done before that memory goes
        if isinstance(self.runner, BroadcastingRunner):
            self.runner.shutdown()
            getattr(self.runner.runner, "close", lambda: None)()   # graphs go before the communicator

    def abort(self, request_id: str) -> bool:
        self.handoff.forget(request_id)
        return self.scheduler.abort_request(request_id)

    def has_unfinished(self) -> bool:
        """Requests still to finish, or (decoding ahead) a step still to collect."""
        return self.scheduler.has_unfinished() or (self.decode_ahead and bool(self._in_flight))

    def step(self) -> list[EngineOutput]:
        """Runs one plan to its tokens. With pipeline stages, first fills the
        pipe: up to one plan per stage is in flight, each with other requests."""
        logprobs, self._pending_logprobs = self._pending_logprobs, {}
        self.scheduler.expire_reservations(time.monotonic())
        if self.decode_ahead:
            plan, result = self._ahead_step()
        elif self.max_plans_in_flight > 1:
            plan, result = self._pipelined_step()
        else:
            plan = self.scheduler.schedule()
            result = self.runner.execute(plan) if plan is not None else None
        if plan is not None:
            self.handoff.take_exports(plan)
            self.scheduler.update_from_output(plan, result.sampled_token_ids)
            for row, entry in enumerate(result.logprobs):
                if entry is not None:
                    rid = plan.request_ids[int(plan.sample_request_index[row])]
                    logprobs.setdefault(rid, []).append(entry)
        results = self._stream(self.scheduler.take_outputs(), logprobs)
        return results + [EngineOutput(rid, [], "", False, kv_export=self.handoff.pop_piece(rid))
                          for rid in self.handoff.waiting_pieces()]   # pieces of prompts still computing

    def _stream(self, outputs: list[RequestOutput], logprobs: dict[str, list]) -> list[EngineOutput]:
        results, detokenizers = [], self._detokenizers
        for out in outputs:
            request_id, new_tokens = out.request_id, out.new_token_ids
            if request_id not in detokenizers:
                continue
            detok = detokenizers[request_id]
            text, stop = "", None
            for token in new_tokens if detok else ():
                delta = detok.push(token)
                text += delta.text
                stop = stop or delta.stop
            finished, reason = out.finished, out.finish_reason
            if stop is not None and not finished:
                self.scheduler.finish_request(request_id, RequestStatus.FINISHED_STOPPED, stop)
                self.scheduler.take_outputs()  # its finished output is this one
                finished, reason = True, "stop"
            elif finished and stop is None and detok:
                text += detok.flush().text
            export = self.handoff.pop_piece(request_id)
            if finished:
                del detokenizers[request_id]
                self.handoff.forget(request_id)
            results.append(EngineOutput(request_id, list(new_tokens), text, finished, reason,
                                        out.error, out.num_prompt_tokens, out.num_cached_tokens,
                                        _take(logprobs, request_id, len(new_tokens)), export))
        return results

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        """Offline: run every prompt to completion, in-flight batched."""
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, params_list):
            self.add_request(rid, prompt, p)
        tokens = {rid: [] for rid in ids}
        texts = {rid: "" for rid in ids}
        done: dict[str, EngineOutput] = {}
        while len(done) < len(ids):
            for out in self.step():
                tokens[out.request_id] += out.new_token_ids
                texts[out.request_id] += out.text
                if out.finished:
                    done[out.request_id] = out
        return [Completion(rid, tokens[rid], texts[rid], done[rid].finish_reason, done[rid].error)
                for rid in ids]

    def stats(self) -> dict[str, float]:
        return {**self.scheduler.stats(), "num_kv_blocks": self.num_kv_blocks}


def _take(logprobs: dict[str, list], request_id: str, num_tokens: int) -> list:
    """The first `num_tokens` log-probability entries of the request (a committed first
    token and the next step's token may both arrive in one step)."""
    entries = logprobs.get(request_id)
    if entries is None:   # the common case: no log-probabilities asked for
        return []
    taken, entries[:num_tokens] = entries[:num_tokens], []
    return taken
