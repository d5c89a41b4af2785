"""Runs a `StepPlan` on this rank's model shard over a paged KV cache.

Owns the KV cache tensors (one K and one V array per layer of this rank's
pipeline stage, [num_blocks, block_size_tokens, num_kv_heads, head_dim])
and turns the plan's host
arrays into device arrays, runs the forward pass, and samples the rows the
plan asks for. It never decides what to schedule: that is the Scheduler's.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardline.kernels.backend import Backend
from shardline.models.config import ModelConfig
from shardline.worker.step_plan import StepPlan

log = logging.getLogger(__name__)


def kv_bytes_per_block(model: Any, block_size_tokens: int) -> int:
    """Bytes of K and V for one block on this rank (its KV heads of its stage's layers only)."""
    c, itemsize = model.config, np.dtype(model.backend.storage_dtype).itemsize
    return 2 * len(model.layers) * block_size_tokens * model.num_kv_heads_per_rank * c.head_dim * itemsize


class PagedKVCache:
    def __init__(self, backend: Backend, config: ModelConfig, num_blocks: int, block_size_tokens: int,
                 num_kv_heads: int, num_layers: int):
        shape = (num_blocks, block_size_tokens, num_kv_heads, config.head_dim)
        self.k = [backend.zeros(shape) for _ in range(num_layers)]
        self.v = [backend.zeros(shape) for _ in range(num_layers)]
        self.num_blocks, self.block_size_tokens = num_blocks, block_size_tokens


class PagedAttentionContext:
    """The model's attention context for one step over the paged cache."""

    def __init__(self, backend: Backend, config: ModelConfig, kv: PagedKVCache, slot_mapping: Any,
                 block_tables: Any, seq_lens: Any, query_start_loc: Any, one_query_each: bool = False):
        """Over the step's arrays on the device (upload_step_inputs, or a CUDA graph's static buffers);
        one_query_each: every sequence has one query token (query_start_loc is 0, 1, ..., B)."""
        self.ops, self.kv, self.one_query_each = backend.ops, kv, one_query_each
        self.slot_mapping, self.block_tables = slot_mapping, block_tables
        self.seq_lens, self.query_start_loc = seq_lens, query_start_loc
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.sliding_window = config.sliding_window

    def attend(self, layer_index: int, q: Any, k: Any, v: Any, positions: Any, cos_sin: Any) -> Any:
        ops, k_cache, v_cache = self.ops, self.kv.k[layer_index], self.kv.v[layer_index]
        if cos_sin is None:
            ops.write_kv(k, v, k_cache, v_cache, self.slot_mapping)
        else:
            q = ops.rope_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, self.slot_mapping)
        return self.attend_rotated(layer_index, q)

    def paged_cache(self, layer_index: int) -> tuple[Any, Any, Any]:
        return self.kv.k[layer_index], self.kv.v[layer_index], self.slot_mapping

    def attend_rotated(self, layer_index: int, q: Any) -> Any:
        return self.ops.paged_attention(q, self.kv.k[layer_index], self.kv.v[layer_index], self.block_tables,
                                        self.seq_lens, self.query_start_loc, self.scale, self.sliding_window,
                                        one_query_each=self.one_query_each)


@dataclass(frozen=True)
class StepResult:
    sampled_token_ids: np.ndarray                       # [S] int32
    logprobs: tuple[dict[int, float] | None, ...] = ()  # per sample row, when asked for


@dataclass
class Launched:
    """A step queued on the device: its sampled tokens there (where the next plan's
    pending tokens come from) and their copy to the host under way."""

    tokens: Any                     # [S] on the device ([S] NumPy on the CPU backend)
    host: np.ndarray                # [S], filled once `done` has passed
    done: Any = None                # CUDA event after the copy; None when `host` is ready
    logprobs: tuple = ()

    @classmethod
    def read_back(cls, backend: Any, tokens: Any, defer: bool = False, stream: Any = None) -> "Launched":
        """`tokens` copied to the host now, or with `defer` queued behind the step on `stream`."""
        if isinstance(tokens, np.ndarray):   # the NumPy backend's, or no sample row
            return cls(tokens, tokens)
        if not defer:
            return cls(tokens, backend.to_numpy(tokens))
        import cupy
        import cupyx
        stream = stream or cupy.cuda.get_current_stream()
        host = cupyx.empty_pinned(tokens.shape, dtype=tokens.dtype)
        cupy.asnumpy(tokens, stream=stream, out=host, blocking=False)
        return cls(tokens, host, stream.record())

    def settle(self) -> None:
        """Waits for the tokens and keeps a copy of them: their host memory may be reused then."""
        if self.done is not None:
            self.done.synchronize()
            self.host, self.done = np.array(self.host, dtype=np.int32), None

    def result(self) -> StepResult:
        self.settle()
        return StepResult(np.array(self.host, dtype=np.int32), self.logprobs)


_STEP_INPUTS = ("token_ids", "slot_mapping", "block_tables", "seq_lens", "query_start_loc", "sample_rows")
SAMPLING_INPUTS = ("temperature", "top_k", "top_p", "seeds", "offsets", "min_p")   # ops.sample's, in its order


def upload_step_inputs(backend: Any, plan: StepPlan) -> dict[str, Any]:
    """The plan's per-step arrays on the device, in one copy (ops.upload): fresh arrays, so
    token_ids may take the pending tokens in place."""
    arrays = {name: getattr(plan, name) for name in _STEP_INPUTS}
    # The kernels' index type: the embedding's gather then casts nothing first (a launch less).
    arrays["token_ids"] = np.asarray(plan.token_ids, dtype=np.int64)
    arrays["positions"] = np.asarray(plan.positions, dtype=np.int64)
    arrays.update((name, getattr(plan.sampling, name)) for name in SAMPLING_INPUTS)
    return backend.ops.upload(arrays)


def with_pending_tokens(xp: Any, token_ids: Any, plan: StepPlan, previous: Launched | None) -> Any:
    """`token_ids` (on the device) with the rows the plan takes from the previous step's
    sampled tokens (decode ahead) filled in there, without a host sync (a graphed step does
    this in its first kernel: worker/cuda_graphs.py)."""
    rows = np.flatnonzero(plan.token_sources >= 0)
    if rows.size == 0:
        return token_ids
    if previous is None:
        raise ValueError(f"plan {plan.step_id}: {rows.size} pending token(s) but no step launched before it")
    dest, sources = xp.asarray(rows), xp.asarray(plan.token_sources[rows])
    token_ids[dest] = previous.tokens[sources].astype(token_ids.dtype)
    return token_ids


class ModelRunner:
    def __init__(self, model: Any, num_blocks: int, block_size_tokens: int):
        self.model, self.backend, self.config = model, model.backend, model.config
        self.kv = PagedKVCache(self.backend, self.config, num_blocks, block_size_tokens,
                               model.num_kv_heads_per_rank, len(model.layers))
        self.graphs = None   # DecodeGraphs (worker/cuda_graphs.py) on a single-rank CUDA engine

    def close(self) -> None:
        """Frees the CUDA graphs (see DecodeGraphs.close); the runner then steps eagerly."""
        if self.graphs is not None:
            self.graphs.close()
            self.graphs = None

    def enable_cuda_graphs(self, max_batch: int, max_model_len: int, capture_now: bool = False) -> None:
        """Decode steps of up to max_batch rows from CUDA graphs, each bucket's captured now
        (`capture_now`) or the first time a step needs it."""
        from shardline.worker.cuda_graphs import DecodeGraphs
        max_batch = min(max_batch, getattr(self.model, "max_graph_rows", max_batch))   # what its layers capture
        if max_batch < 1:
            return
        self.graphs = DecodeGraphs(self, max_batch, -(-max_model_len // self.kv.block_size_tokens))
        if capture_now:
            began = time.perf_counter()
            self.graphs.capture_all()
            if self.graphs.disabled is None:
                log.info("CUDA graphs of %d decode buckets (1-%d rows) captured in %.2f s", len(self.graphs.buckets),
                         self.graphs.buckets[-1], time.perf_counter() - began)

    def read_kv(self, slots: np.ndarray, to_host: bool = True) -> tuple[Any, Any]:
        """This rank's K and V at cache `slots` (block * block_size + offset), [num_layers,
        num_slots, num_kv_heads, head_dim] each, in the storage dtype; one gather for all layers.
        `to_host=False` leaves them on the GPU (a KV link sends them from there)."""
        rows = self.backend.ops.gather_cache_rows(self.kv.k + self.kv.v, self.backend.xp.asarray(slots))
        if self.backend.name != "numpy":
            # On the GPU the rows are complete before another thread (a KV link's) reads them.
            rows = rows.get() if to_host else rows
            self.backend.xp.cuda.get_current_stream().synchronize()
        num_layers = len(self.kv.k)
        return rows[:num_layers], rows[num_layers:]

    def write_kv(self, slots: np.ndarray, k: Any, v: Any) -> None:
        """Writes K and V [num_layers, num_slots, this rank's KV heads, head_dim] (storage dtype) at `slots`."""
        xp = self.backend.xp
        rows = xp.concatenate([xp.asarray(k), xp.asarray(v)])
        self.backend.ops.scatter_cache_rows(self.kv.k + self.kv.v, xp.asarray(slots), rows)
        if self.backend.name != "numpy":
            # Done with k and v before the caller drops them: received over a KV link, their
            # memory belongs to the link's stream, whose next receive may reuse it at once.
            xp.cuda.get_current_stream().synchronize()

    def execute(self, plan: StepPlan, sample: bool = True) -> StepResult:
        """Runs the step; `sample=False` (tensor-parallel followers, whose
        tokens nobody reads) skips sampling but not the collectives. A
        graphed step samples on every rank (the graph is the whole step)."""
        return self.launch(plan, sample=sample).result()

    def launch(self, plan: StepPlan, previous: Launched | None = None, sample: bool = True,
               defer: bool = False) -> Launched:
        """Runs the step (with `defer`: queues it on the device and starts copying its tokens
        back); `previous` is the step launched before it, whose sampled tokens fill the
        plan's pending ones."""
        if self.graphs is not None and self.graphs.accepts(plan):
            launched = self.graphs.launch(plan, previous, defer)
            if launched is not None:
                return launched
        inputs = upload_step_inputs(self.backend, plan)
        ctx = self.begin_step(plan, inputs)
        token_ids = with_pending_tokens(self.backend.xp, inputs["token_ids"], plan, previous)
        hidden = self.model.forward(token_ids, inputs["positions"], ctx)
        return self._finish_launch(plan, hidden, sample, inputs, defer)

    def begin_step(self, plan: StepPlan, inputs: dict[str, Any]) -> PagedAttentionContext:
        """Copies the plan's copy-on-write blocks; the step's attention context over `inputs`
        (upload_step_inputs)."""
        backend, xp = self.backend, self.backend.xp
        if plan.block_copies.size:
            copies = xp.asarray(plan.block_copies)
            for k_cache, v_cache in zip(self.kv.k, self.kv.v):
                backend.ops.copy_blocks(k_cache, v_cache, copies)
        return PagedAttentionContext(backend, self.config, self.kv, inputs["slot_mapping"], inputs["block_tables"],
                                     inputs["seq_lens"], inputs["query_start_loc"], plan.one_query_each)

    def finish_step(self, plan: StepPlan, hidden: Any, sample: bool, inputs: dict[str, Any]) -> StepResult:
        """Logits of the plan's sample rows of `hidden` [num_tokens, hidden], sampled."""
        return self._finish_launch(plan, hidden, sample, inputs).result()

    def _finish_launch(self, plan: StepPlan, hidden: Any, sample: bool, inputs: dict[str, Any],
                       defer: bool = False) -> Launched:
        backend = self.backend
        if plan.sample_rows.size == 0:
            return Launched.read_back(backend, np.zeros(0, dtype=np.int32))
        logits = self.model.compute_logits(backend.ops.index_rows(hidden, inputs["sample_rows"]))
        if not sample:
            return Launched.read_back(backend, np.zeros(0, dtype=np.int32))
        return self._sample(logits, plan, defer, inputs)

    def _sample(self, logits: Any, plan: StepPlan, defer: bool, inputs: dict[str, Any]) -> Launched:
        """`inputs` (upload_step_inputs): the sampling parameters, and the token ids with the
        pending tokens filled in."""
        ops, xp, s, token_ids = self.backend.ops, self.backend.xp, plan.sampling, inputs["token_ids"]
        if s.prompt_ids.shape[1] or s.output_ids.shape[1]:
            output_ids = xp.array(s.output_ids)
            pending = np.flatnonzero(plan.token_sources[plan.sample_rows] >= 0)
            if pending.size and s.output_ids.shape[1]:   # the pending tokens join the histories
                output_ids[xp.asarray(pending), xp.asarray(s.output_lens[pending] - 1)] = \
                    token_ids[xp.asarray(plan.sample_rows[pending])].astype(output_ids.dtype)
            logits = ops.apply_penalties(logits, *(xp.asarray(a) for a in (
                s.prompt_ids, s.prompt_lens, output_ids, s.output_lens, s.repetition_penalty,
                s.presence_penalty, s.frequency_penalty)))
        *args, min_p = (inputs[name] for name in SAMPLING_INPUTS)
        tokens = ops.sample(logits, *args, min_p=min_p)
        if s.num_logprobs.any():   # read on the host now: the step is finished here
            host = self.backend.to_numpy(tokens)
            return Launched(tokens, host, None, self._logprobs(logits, s.num_logprobs, host))
        return Launched.read_back(self.backend, tokens, defer)

    def _logprobs(self, logits: Any, num_logprobs: np.ndarray, tokens: np.ndarray):
        """The sampled token's and the top-n tokens' log-probabilities under the
        model's distribution (before temperature and filtering)."""
        host = self.backend.to_numpy(logits).astype(np.float64)
        out = []
        for row, n, token in zip(host, num_logprobs, tokens):
            if n == 0:
                out.append(None)
                continue
            logp = row - row.max() - np.log(np.sum(np.exp(row - row.max())))
            top = np.argsort(-logp, kind="stable")[:n]
            out.append({int(t): float(logp[t]) for t in (*top, token)})
        return tuple(out)
