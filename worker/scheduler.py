"""In-flight batching: which requests advance by how many tokens each step.

Each step, under a token budget and a sequence cap, the scheduler keeps the
running requests going first (a decode takes one token, a partly prefilled
prompt its next chunk), then admits waiting ones (FCFS, or by (priority,
arrival)), reusing cached prefix blocks. When blocks run out it preempts by
recompute. It returns a `StepPlan` and, after the step ran, turns the
sampled tokens into `RequestOutput`s.

It is pure Python on the group leader (numpy only to build the plan): it
must not import GPU or model code, touch KV tensors, or write block tables
(the BlockManager owns them). One plan is in flight at a time, or one per
pipeline stage (disjoint requests), or, decoding ahead, two: the second
takes the next token of requests still decoding in the first.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
import numpy as np

from shardline.worker.block_manager import BlockManager
from shardline.worker.request_queues import FcfsQueues, PriorityQueues
from shardline.worker.request import Request, RequestStatus
from shardline.worker.scheduler_config import SchedulerConfig
from shardline.worker.plan_builder import build_step_plan
from shardline.worker.step_plan import StepPlan


@dataclass(frozen=True, slots=True)   # slots: one is made per request per step
class RequestOutput:
    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool
    status: RequestStatus
    finish_reason: str | None          # "stop" | "length" | "abort" | "error"
    error: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    stop_reason: str | int | None = None   # the stop string or stop token id that ended it


RESERVATION_EXPIRED = "reservation: the remote KV did not arrive before the reservation expired"


@dataclass(frozen=True)
class _InFlight:
    """A plan whose tokens are not back yet."""
    step_id: int
    requests: dict[str, Request]   # its requests by id: the objects, since a finished id may be reused meanwhile
    tokens: dict[str, int]         # tokens each computes there
    sample_rows: dict[str, int]    # the sample row of each that samples there


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        if block_manager.block_size_tokens != config.block_size_tokens:
            raise ValueError(f"block_size_tokens: config says {config.block_size_tokens}, "
                             f"block manager has {block_manager.block_size_tokens}")
        self.config, self.block_manager = config, block_manager
        self._queues = PriorityQueues() if config.policy == "priority" else FcfsQueues()
        self._requests: dict[str, Request] = {}   # every unfinished request
        self._running: list[Request] = []         # in scheduling order; the last is preempted first
        self._outputs: list[RequestOutput] = []
        self._num_steps = 0
        self._num_preemptions = 0
        self._num_ahead_tokens = 0   # tokens scheduled while the step sampling them was in flight
        self._in_flight: deque[_InFlight] = deque()   # oldest first
        # Requests holding blocks for KV a prefill group pushes: request id -> deadline (monotonic s).
        self._reserved: dict[str, float] = {}

    # ---- requests in and out -------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        # Output tokens are allowed: a request retried from another group resumes like a preempted one.
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens:
            raise ValueError(f"request {request.request_id!r} must be WAITING with nothing computed")
        if request.num_output_tokens >= request.params.max_tokens:
            raise ValueError(f"output_token_ids: request {request.request_id!r} already has max_tokens tokens")
        problem = self._why_it_never_fits(request)
        if problem is not None:
            request.finish(RequestStatus.FINISHED_ERROR, error=problem)
            self._emit(request, ())
            return
        self._requests[request.request_id] = request
        self._queues.add_waiting(request)

    def reserve_for_remote_kv(self, request: Request, deadline_s: float) -> bool:
        """Blocks for the whole prompt (cached prefix shared) until `commit_remote_kv` or the deadline.
        False, changing nothing, when blocks or a running seat are not free now or the request
        cannot be taken at all: the caller adds it as an ordinary request instead."""
        if request.request_id in self._requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        if (request.status is not RequestStatus.WAITING or request.num_computed_tokens or request.output_token_ids
                or self._seats_taken >= self.config.max_num_seqs
                or self._why_it_never_fits(request) is not None):
            return False
        computed = self.block_manager.get_computed_blocks(request)
        if computed.rewrites_last_block or not self.block_manager.allocate_slots(   # all cached: nothing to push
                request, request.num_tokens - computed.num_tokens, computed):
            return False
        request.num_cached_tokens = request.num_computed_tokens = computed.num_tokens
        request.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self._requests[request.request_id] = request
        self._reserved[request.request_id] = deadline_s
        return True

    @property
    def _seats_taken(self) -> int:
        """Running requests plus reserved ones, which run as soon as their KV arrives."""
        return len(self._running) + len(self._reserved)

    def get_request(self, request_id: str) -> Request | None:
        """An unfinished request, whatever its status."""
        return self._requests.get(request_id)

    def reserved_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id) if request_id in self._reserved else None

    def commit_remote_kv(self, request_id: str, first_token_id: int) -> None:
        """The prompt's KV is in the reserved blocks: the request runs on, its
        first token (sampled by the prefill group) appended."""
        request = self.reserved_request(request_id)
        if request is None:
            raise KeyError(f"request_id {request_id!r} holds no KV reservation")
        del self._reserved[request_id]
        request.num_computed_tokens = request.num_prompt_tokens
        self.block_manager.cache_full_blocks(request)
        request.status = RequestStatus.RUNNING
        self._queues.add_running(self._running, request)
        self._append_token(request, first_token_id)

    def expire_reservations(self, now_s: float) -> None:
        for request_id in [rid for rid, deadline in self._reserved.items() if deadline <= now_s]:
            self.finish_request(request_id, RequestStatus.FINISHED_ERROR, RESERVATION_EXPIRED)

    def _why_it_never_fits(self, request: Request) -> str | None:
        num_prompt, max_tokens = request.num_prompt_tokens, request.params.max_tokens
        total = num_prompt + max_tokens
        if total > self.config.max_model_len:
            return (f"max_tokens: prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) = {total} "
                    f"exceeds max_model_len ({self.config.max_model_len})")
        # The last sampled token is never fed back, so its K/V never needs a slot.
        num_blocks = self.block_manager.num_blocks_for(total - 1)
        if num_blocks > self.block_manager.num_blocks:
            return (f"max_tokens: prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) needs {num_blocks} "
                    f"KV blocks of {self.config.block_size_tokens} tokens, but the pool holds only "
                    f"{self.block_manager.num_blocks}")
        return None

    def abort_request(self, request_id: str) -> bool:
        """Finish the request as aborted and free its blocks; False if it is unknown or finished."""
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(self, request_id: str, status: RequestStatus, reason: str | None = None) -> bool:
        """End a request from outside the step loop (a stop string, an abort, an error); `reason`
        is kept as the error message for FINISHED_ERROR, else as the stop reason."""
        request = self._requests.get(request_id)
        if request is None:
            return False
        if status is RequestStatus.FINISHED_ERROR:
            self._finish(request, status, error=reason or "request failed")
        else:
            self._finish(request, status, stop_reason=reason)
        return True

    def take_outputs(self) -> list[RequestOutput]:
        outputs, self._outputs = self._outputs, []
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def stats(self) -> dict[str, float]:
        prefix = self.block_manager.prefix_stats()
        return {"num_running": len(self._running), "num_waiting": len(self._queues.waiting),
                "num_reserved": len(self._reserved),
                "kv_usage": self.block_manager.usage(), "prefix_hit_rate": prefix.hit_rate,
                "prefix_query_tokens": prefix.query_tokens, "prefix_hit_tokens": prefix.hit_tokens,
                "num_preemptions": self._num_preemptions, "num_steps": self._num_steps,
                "num_steps_done": self._num_steps - len(self._in_flight),   # plans whose tokens came back
                "num_decode_ahead_tokens": self._num_ahead_tokens}

    # ---- one step ------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        """The next step's plan, or None when no request can advance."""
        if len(self._in_flight) >= self.config.max_plans_in_flight:
            raise RuntimeError(f"{len(self._in_flight)} plan(s) in flight (step {self._in_flight[0].step_id} oldest): "
                               f"call update_from_output first")
        scheduled: list[tuple[Request, int]] = []
        ahead: dict[str, tuple[int, int]] = {}
        num_preemptions_before = self._num_preemptions
        budget_tokens = self._schedule_running(scheduled, ahead, self.config.max_num_batched_tokens)
        # Blocks just ran out: admitting more would only preempt again.
        if self._num_preemptions == num_preemptions_before:
            self._admit_waiting(scheduled, budget_tokens)
        copies = self.block_manager.take_block_copies()
        if not scheduled:
            return None
        tables = [self.block_manager.block_table(r.request_id) for r, _ in scheduled]
        plan = build_step_plan(self._num_steps, scheduled, tables, copies, self.config.block_size_tokens, ahead)
        request_ids = plan.request_ids
        self._in_flight.append(_InFlight(
            plan.step_id, {r.request_id: r for r, _ in scheduled}, {r.request_id: n for r, n in scheduled},
            {request_ids[i]: row for row, i in enumerate(plan.sample_request_index.tolist())}))
        self._num_steps += 1
        return plan

    def _in_a_plan(self, request: Request) -> bool:
        # A plain loop: called for every running request each step, over at most a few plans.
        request_id = request.request_id
        for plan in self._in_flight:
            if request_id in plan.requests:
                return True
        return False

    def _schedule_ahead(self, request: Request, scheduled: list[tuple[Request, int]],
                        ahead: dict[str, tuple[int, int]], budget_tokens: int) -> int:
        """Decode ahead for a request in the one plan in flight: its next prompt chunk, or the token it
        samples there (pending), unless that token ends it by length; unforeseen stops leave a row
        computed and dropped. No preemption for a step ahead. Returns the budget left."""
        if not self.config.decode_ahead or len(self._in_flight) != 1:
            return budget_tokens
        plan, request_id = self._in_flight[0], request.request_id
        in_flight = plan.tokens[request_id]
        row = plan.sample_rows.get(request_id)
        if row is None:   # mid-prompt: the next chunk, whose tokens are known
            num_new, row = min(request.num_tokens_to_compute - in_flight, budget_tokens), -1
        elif self._ends_by_length(request, 1):
            return budget_tokens
        else:
            num_new = 1
        if num_new < 1 or not self.block_manager.allocate_slots(request, in_flight + num_new):
            return budget_tokens
        scheduled.append((request, num_new))
        ahead[request_id] = (in_flight, row)
        self._num_ahead_tokens += row >= 0
        return budget_tokens - num_new

    def _schedule_running(self, scheduled: list[tuple[Request, int]], ahead: dict[str, tuple[int, int]],
                          budget_tokens: int) -> int:
        index = 0
        while index < len(self._running) and budget_tokens > 0:
            request = self._running[index]
            if self._in_a_plan(request):   # its tokens are not back yet
                budget_tokens = self._schedule_ahead(request, scheduled, ahead, budget_tokens)
                index += 1
                continue
            num_new_tokens = min(request.num_tokens_to_compute, budget_tokens)
            if not self._allocate_or_preempt(request, num_new_tokens):
                break   # it preempted itself, the last of the list
            scheduled.append((request, num_new_tokens))
            budget_tokens -= num_new_tokens
            index += 1
        return budget_tokens

    def _allocate_or_preempt(self, request: Request, num_new_tokens: int) -> bool:
        # Victims come from the unscheduled tail, so nothing already planned (in
        # this step or in a plan still in flight) loses its blocks.
        while not self.block_manager.allocate_slots(request, num_new_tokens):
            victim = next(r for r in reversed(self._running) if r is request or not self._in_a_plan(r))
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        """Recompute later: drop its KV, keep its output tokens (sampling noise depends only
        on (seed, output index), so the continuation is the same)."""
        self.block_manager.free(request)
        self._running.remove(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self._num_preemptions += 1
        self._queues.add_preempted(request)

    def _admit_waiting(self, scheduled: list[tuple[Request, int]], budget_tokens: int) -> None:
        waiting, manager = self._queues.waiting, self.block_manager
        while waiting and budget_tokens > 0 and self._seats_taken < self.config.max_num_seqs:
            request = waiting[0]
            computed = manager.get_computed_blocks(request)
            num_new_tokens = min(request.num_tokens - computed.num_tokens, budget_tokens)
            if not manager.allocate_slots(request, num_new_tokens, computed):
                break   # head-of-line: later arrivals do not overtake it
            self._queues.pop_waiting()
            if request.status is RequestStatus.WAITING:
                request.num_cached_tokens = computed.num_tokens
            request.num_computed_tokens = computed.num_tokens
            request.status = RequestStatus.RUNNING
            self._queues.add_running(self._running, request)
            scheduled.append((request, num_new_tokens))
            budget_tokens -= num_new_tokens

    # ---- after the step ------------------------------------------------

    def update_from_output(self, plan: StepPlan, sampled_token_ids: np.ndarray) -> None:
        """Advance the plan's requests; `sampled_token_ids` is [S] int32 in `sample_rows` order."""
        oldest = self._in_flight[0].step_id if self._in_flight else None
        if plan.step_id != oldest:
            raise ValueError(f"plan: step {plan.step_id} is not the oldest one in flight ({oldest})")
        sampled = np.asarray(sampled_token_ids)
        if sampled.shape != plan.sample_rows.shape:
            raise ValueError(f"sampled_token_ids: expected shape {plan.sample_rows.shape}, got {sampled.shape}")
        planned = self._in_flight.popleft().requests
        # Looked up once: appending a token can finish only the request it goes to.
        live = [self._running_request(request_id, planned) for request_id in plan.request_ids]
        for request, num_tokens in zip(live, plan.num_scheduled_tokens.tolist()):
            if request is not None:
                request.num_computed_tokens += num_tokens
                self.block_manager.cache_full_blocks(request)
        for request_index, token_id in zip(plan.sample_request_index.tolist(), sampled.tolist()):
            request = live[request_index]
            if request is not None:   # else finished (aborted) while the step ran
                self._append_token(request, int(token_id))

    def _running_request(self, request_id: str, planned: dict[str, Request]) -> Request | None:
        """The running request the plan was made for (not a later one given its id)."""
        request = self._requests.get(request_id)
        return request if request is planned.get(request_id) and request.status is RequestStatus.RUNNING else None

    def _append_token(self, request: Request, token_id: int) -> None:
        request.output_token_ids.append(token_id)
        params = request.params
        if token_id in params.stop_token_ids:
            self._finish(request, RequestStatus.FINISHED_STOPPED, stop_reason=token_id, new_tokens=(token_id,))
        elif token_id in request.eos_token_ids and not params.ignore_eos:
            self._finish(request, RequestStatus.FINISHED_STOPPED, new_tokens=(token_id,))
        elif self._ends_by_length(request):
            self._finish(request, RequestStatus.FINISHED_LENGTH, new_tokens=(token_id,))
        else:
            self._emit(request, (token_id,))

    def _ends_by_length(self, request: Request, more: int = 0) -> bool:
        """Whether the request, with `more` tokens beyond those it has, is at max_tokens or max_model_len."""
        num_output_tokens = request.num_output_tokens + more
        return (num_output_tokens >= request.params.max_tokens
                or request.num_prompt_tokens + num_output_tokens >= self.config.max_model_len)

    def _finish(self, request: Request, status: RequestStatus, stop_reason: str | int | None = None,
                error: str | None = None, new_tokens: tuple[int, ...] = ()) -> None:
        if request in self._running:
            self._running.remove(request)
        self._reserved.pop(request.request_id, None)
        self._queues.discard(request)
        self.block_manager.free(request)
        del self._requests[request.request_id]
        request.finish(status, stop_reason=stop_reason, error=error)
        self._emit(request, new_tokens)

    def _emit(self, request: Request, new_tokens: tuple[int, ...]) -> None:
        self._outputs.append(RequestOutput(
            request_id=request.request_id, new_token_ids=new_tokens, finished=request.status.is_finished,
            status=request.status, finish_reason=request.finish_reason, error=request.error,
            num_prompt_tokens=request.num_prompt_tokens, num_cached_tokens=request.num_cached_tokens,
            stop_reason=request.stop_reason))

    def check_integrity(self) -> None:
        """The block manager's invariants plus the scheduler's own (AssertionError if broken)."""
        self.block_manager.check_integrity()
        if len(self._running) > self.config.max_num_seqs:
            raise AssertionError(f"{len(self._running)} running > max_num_seqs {self.config.max_num_seqs}")
        for request in self._running:
            covered = len(self.block_manager.block_table(request.request_id)) * self.config.block_size_tokens
            if request.status is not RequestStatus.RUNNING or covered < request.num_computed_tokens:
                raise AssertionError(f"running request {request.request_id}: {request.status}, "
                                     f"{request.num_computed_tokens} computed tokens, {covered} slots")
        for request in self._queues.waiting:
            if self.block_manager.block_table(request.request_id) or request.num_computed_tokens:
                raise AssertionError(f"waiting request {request.request_id} holds KV")
        for request_id in self._reserved:
            request = self._requests[request_id]
            covered = len(self.block_manager.block_table(request_id)) * self.config.block_size_tokens
            if request.status is not RequestStatus.WAITING_FOR_REMOTE_KV or covered < request.num_prompt_tokens:
                raise AssertionError(f"reserved request {request_id}: {request.status}, {covered} slots")
        if len(self._running) + len(self._queues.waiting) + len(self._reserved) != len(self._requests):
            raise AssertionError("a request is neither running, waiting nor reserved")
        in_plans = [rid for plan in self._in_flight for rid in plan.requests]
        if not self.config.decode_ahead and len(in_plans) != len(set(in_plans)):
            raise AssertionError(f"a request is in two plans in flight: {sorted(in_plans)}")
