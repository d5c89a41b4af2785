"""Turns the scheduler's choice for one step — (request, new tokens) pairs and
their block tables — into a `StepPlan`'s flat arrays. Pure NumPy; it decides
nothing (that is the Scheduler's) and imports no kernel or model code.
"""

from __future__ import annotations

from itertools import accumulate

import numpy as np

from shardline.worker.request import Request
from shardline.worker.step_plan import SamplingBatch, StepPlan


def build_step_plan(step_id: int, scheduled: list[tuple[Request, int]], tables: list[list[int]],
                    copies: list[tuple[int, int]], block_size_tokens: int,
                    ahead: dict[str, tuple[int, int]] | None = None) -> StepPlan:
    """Flatten the scheduled (request, num_new_tokens) pairs; `tables` are their block tables.
    `ahead`: requests also in the plan in flight -> (tokens they compute there, the row of
    the token they sample there among its sampled tokens, or -1): their tokens here start
    after those, and with a row the one token here is that pending one."""
    # Per-row values are gathered in Python lists and turned into arrays once: at hundreds
    # of rows, per-row NumPy calls cost more than the step's other host work.
    ahead = ahead or {}
    requests = [r for r, _ in scheduled]
    count_list = [n for _, n in scheduled]
    skip = [ahead.get(r.request_id, (0, -1)) for r in requests]                  # (in flight, pending row)
    start_list = [r.num_computed_tokens + s for r, (s, _) in zip(requests, skip)]
    row_list = [row for _, row in skip]
    counts = np.array(count_list, dtype=np.int32)                              # [B]
    starts = np.array(start_list, dtype=np.int32)                              # [B]
    seq_lens = starts + counts                                                   # [B]
    query_start_loc = np.array([0, *accumulate(count_list)], dtype=np.int32)    # [B + 1]
    token_ids = np.array(_known_tokens(requests, start_list, count_list, row_list), dtype=np.int32)   # [T]
    pending_rows = np.array(row_list, dtype=np.int32)                          # [B]
    if len(token_ids) == len(requests):   # a token each (a decode step): rows are tokens
        token_sources, row_of_token, positions = pending_rows, np.arange(len(requests)), starts
    else:
        token_sources = np.repeat(pending_rows, counts)                          # [T]
        row_of_token = np.repeat(np.arange(len(requests)), counts)               # [T]
        positions = (np.arange(token_ids.shape[0], dtype=np.int32)
                     - np.repeat(query_start_loc[:-1], counts) + np.repeat(starts, counts))
    block_tables, _ = _pad_rows(tables, -(-seq_lens // block_size_tokens))      # [B, max_blocks]
    slot_mapping = (block_tables[row_of_token, positions // block_size_tokens].astype(np.int64) * block_size_tokens
                    + positions % block_size_tokens)
    pending = pending_rows >= 0                                                  # [B]
    samples = (np.array([r.num_tokens for r in requests], dtype=np.int32) == seq_lens) | pending
    sample_request_index = np.flatnonzero(samples).astype(np.int32)              # [S]
    return StepPlan(
        step_id=step_id, request_ids=tuple(r.request_id for r in requests), num_scheduled_tokens=counts,
        token_ids=token_ids, positions=positions.astype(np.int32, copy=False), slot_mapping=slot_mapping,
        query_start_loc=query_start_loc, seq_lens=seq_lens, block_tables=block_tables,
        sample_rows=(query_start_loc[1:][samples] - 1).astype(np.int32),
        sample_request_index=sample_request_index,
        sampling=build_sampling_batch([requests[i] for i in sample_request_index.tolist()],
                                      pending[sample_request_index]),
        block_copies=np.array(copies, dtype=np.int32).reshape(len(copies), 2), token_sources=token_sources)


def _known_tokens(requests: list[Request], starts: list[int], counts: list[int], pending_rows: list[int]) -> list[int]:
    """The rows' tokens back to back; a pending token (decode ahead) is a 0 the device overwrites."""
    tokens: list[int] = []
    for request, start, count, row in zip(requests, starts, counts, pending_rows):
        if row >= 0:
            tokens.append(0)
        else:
            tokens += request.tokens(start, start + count)
    return tokens


def build_sampling_batch(requests: list[Request], pending: np.ndarray | None = None) -> SamplingBatch:
    """One row per sampling request; penalty history only when some row uses a penalty.
    A `pending` row (decode ahead) samples the output token after its pending one, whose
    place in the output history is the last (0 here: the runner fills it on the device)."""
    params = [r.params for r in requests]
    num_rows = len(requests)
    pending = np.zeros(num_rows, dtype=bool) if pending is None else pending
    # The columns of each dtype in one conversion (rows of one array), not one conversion each.
    floats = np.array([[p.temperature for p in params], [p.top_p for p in params], [p.min_p for p in params],
                       [p.repetition_penalty for p in params], [p.presence_penalty for p in params],
                       [p.frequency_penalty for p in params]], dtype=np.float32).reshape(6, num_rows)
    ints = np.array([[p.top_k for p in params], [p.logprobs for p in params]], dtype=np.int32).reshape(2, num_rows)
    if any(p.uses_penalties for p in params):
        prompt_ids, prompt_lens = _pad_rows([r.prompt_token_ids for r in requests])
        output_ids, output_lens = _pad_rows([r.output_token_ids + [0] * int(p) for r, p in zip(requests, pending)])
    else:   # no row uses a penalty: no history, width 0
        prompt_ids, output_ids = np.zeros((2, num_rows, 0), dtype=np.int32)
        prompt_lens, output_lens = np.zeros((2, num_rows), dtype=np.int32)
    return SamplingBatch(
        temperature=floats[0], top_k=ints[0], top_p=floats[1], min_p=floats[2],
        seeds=np.array([p.seed for p in params], dtype=np.uint64),
        offsets=np.array([r.num_output_tokens for r in requests], dtype=np.int64) + pending,
        repetition_penalty=floats[3], presence_penalty=floats[4], frequency_penalty=floats[5],
        prompt_ids=prompt_ids, prompt_lens=prompt_lens, output_ids=output_ids, output_lens=output_lens,
        num_logprobs=ints[1])


def _pad_rows(rows: list, lens: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[S, max_len] int32: row i holds rows[i][:lens[i]] (all of it by default), then 0s;
    and the [S] int32 lengths."""
    if lens is None:
        lens = np.fromiter(map(len, rows), dtype=np.int32, count=len(rows))
    width = int(lens.max()) if len(rows) else 0
    if len(rows) and int(lens.min()) == width:   # every row as long (a batch of one, say): no padding
        return np.array([row[:width] for row in rows], dtype=np.int32).reshape(len(rows), width), lens
    flat: list[int] = []
    for row, length in zip(rows, lens.tolist()):
        flat += row[:length]
    padded = np.zeros((len(rows), width), dtype=np.int32)
    # Boolean-mask assignment fills row by row, in order: one conversion instead of one per row.
    padded[np.arange(padded.shape[1]) < lens[:, None]] = flat
    return padded, lens
