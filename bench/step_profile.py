"""Where one decode step's time goes on the GPU: host phases of LLMEngine.step
(schedule, execute, update) in wall time, and the GPU time of the forward
pass alone (CUDA events), eager and replayed from the CUDA graph.

Run:  python -m bench.step_profile --shape smollm2-135m --batch 1
With --ahead-timeline N it instead profiles N times the decode steps as bench.llm and
bench.decode_ab time them (decode ahead on): their median wall time against the GPU's busy
time and idle gaps over those steps (gpu_timeline), to tell a step the GPU takes longer from
one it waits in, and each kernel's and copy's share of a step's critical path
(per_step_kernels); and the graph's replay alone.
With --kernels it also lists the GPU time of every kernel name (CUPTI through
torch.profiler, which sees cupy's launches too) in one eager decode forward, in one
replay of its CUDA graph (dependent launches overlap there, so a kernel's time may
include its wait for the one before) and in the prefill of a --prefill-tokens prompt;
and splits three TTFTs of such a prompt into GPU busy time, the GPU's idle gaps, and
the host's time before the first GPU activity and after the last (gpu_timeline).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm import GPU_MEMORY_FRACTION, SHAPES, build_ours, decode_step_s  # noqa: E402
from step_parts import kernel_adds  # noqa: E402
from tp_decode import cuda_intervals  # noqa: E402


def phases(engine, steps: int) -> dict[str, float]:
    """Median wall seconds of each phase of the engine's step, over `steps` decode steps."""
    import cupy
    times: dict[str, list[float]] = {"schedule": [], "execute": [], "update": [], "whole": []}
    for _ in range(steps):
        t0 = time.perf_counter()
        plan = engine.scheduler.schedule()
        t1 = time.perf_counter()
        result = engine.runner.execute(plan)
        cupy.cuda.Device().synchronize()
        t2 = time.perf_counter()
        engine.scheduler.update_from_output(plan, result.sampled_token_ids)
        engine.scheduler.take_outputs()
        t3 = time.perf_counter()
        for name, value in (("schedule", t1 - t0), ("execute", t2 - t1), ("update", t3 - t2), ("whole", t3 - t0)):
            times[name].append(value)
    return {name: float(np.median(v)) for name, v in times.items()}


def gpu_forward_s(engine, plan, graphed: bool, reps: int = 20, rows: int | None = None) -> tuple[float, float]:
    """(GPU seconds of one step's forward as CUDA events see it, host seconds to issue it);
    graphed, the replay of the graph for the plan's rows (or `rows`)."""
    import cupy
    from shardline.worker.model_runner import upload_step_inputs
    runner = engine.runner
    if graphed:
        rows = rows or len(plan.request_ids)
        bucket = runner.graphs._captured[next(b for b in runner.graphs.buckets if b >= rows)]
        stream = runner.graphs._stream
        stream.synchronize()
        slot = bucket.staging[0].arrays   # as the engine left it, but no pending tokens: their source may be gone
        slot["header"][0], slot["token_sources"][:] = 0, -1

        def once():
            bucket.graphs[0].launch(stream=stream)   # reads staging slot 0 as the engine left it
    else:
        stream = cupy.cuda.get_current_stream()

        def once():
            inputs = upload_step_inputs(runner.backend, plan)   # as the runner passes them
            ctx = runner.begin_step(plan, inputs)
            runner.model.compute_logits(runner.model.forward(inputs["token_ids"], inputs["positions"], ctx))
    once()
    begin, end = cupy.cuda.Event(), cupy.cuda.Event()
    begin.record(stream)
    host_begin = time.perf_counter()
    for _ in range(reps):
        once()
    host_s = (time.perf_counter() - host_begin) / reps
    end.record(stream)
    end.synchronize()
    return cupy.cuda.get_elapsed_time(begin, end) / 1000 / reps, host_s


def kernel_times(run, reps: int = 3, top: int = 20) -> list[dict]:
    """GPU microseconds per call of run, by kernel name, largest first (first call unprofiled)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            run()
        torch.cuda.synchronize()
    rows = [{"kernel": e.key[:90], "us": e.self_device_time_total / reps, "calls": e.count // reps}
            for e in prof.key_averages() if e.self_device_time_total > 0]
    rows.sort(key=lambda r: -r["us"])
    total = sum(r["us"] for r in rows)
    return [{"kernel": "(all)", "us": total, "calls": sum(r["calls"] for r in rows)}] + rows[:top]


def gpu_timeline(intervals: list[tuple[float, float, str]], wall_us: float, top: int = 8) -> dict:
    """Where a run's wall time went, from its GPU activities (start, end, name), in us: the span
    from the first start to the last end; busy, the time some activity ran (their union); the
    activities' own sum (above busy where they overlap, as dependent launches do); the idle
    time inside the span and its longest gaps, each with the activity that waited; and the
    wall time outside the span (the host before the first activity and after the last)."""
    if not intervals:
        raise ValueError("gpu_timeline: no GPU activity was recorded")
    spans = sorted(intervals)
    busy, gaps = 0.0, []
    run_start, run_end = spans[0][0], spans[0][1]
    for start, end, name in spans[1:]:
        if start > run_end:   # the GPU idled until this one
            busy += run_end - run_start
            gaps.append((start - run_end, name))
            run_start, run_end = start, end
        else:
            run_end = max(run_end, end)
    busy += run_end - run_start
    span = max(end for _, end, _ in spans) - spans[0][0]
    gaps.sort(key=lambda gap: -gap[0])
    return {"wall_ms": wall_us / 1e3, "gpu_span_ms": span / 1e3, "gpu_busy_ms": busy / 1e3,
            "activity_sum_ms": sum(end - start for start, end, _ in spans) / 1e3,
            "idle_in_span_ms": (span - busy) / 1e3, "outside_span_ms": (wall_us - span) / 1e3,
            "activities": len(spans),
            "longest_gaps": [{"us": gap, "before": name[:80]} for gap, name in gaps[:top]]}


def prefill_timeline(engine, tokens: int, rng) -> dict:
    """gpu_timeline of one TTFT: a fresh `tokens`-token prompt in, its first token out (torch.profiler,
    which sees cupy's kernels and copies too)."""
    import cupy
    from torch.profiler import ProfilerActivity, profile
    from shardline.worker.sampling_params import SamplingParams
    prompt = rng.integers(0, engine.local.model.config.vocab_size, tokens).tolist()
    cupy.cuda.Device().synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        begin = time.perf_counter()
        engine.add_request("timeline", prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        while not any(out.new_token_ids or out.finished for out in engine.step()):
            pass
        wall = time.perf_counter() - begin
    engine.abort("timeline")
    engine.step()
    return gpu_timeline(cuda_intervals(prof), wall * 1e6)


def ahead_timeline(engine, batch: int, context: int, steps: int, rng) -> dict:
    """gpu_timeline of `steps` decode steps run as bench.llm times them (decode_step_s, decode
    ahead on), with their median wall time and the GPU's busy and idle time a step."""
    import cupy
    from torch.profiler import ProfilerActivity, profile
    seen: dict = {}

    @contextlib.contextmanager
    def profiled():
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            begin = time.perf_counter()
            yield
            cupy.cuda.Device().synchronize()
            seen["wall_us"] = (time.perf_counter() - begin) * 1e6
        seen["prof"] = prof

    step_s = decode_step_s(engine, batch, context, steps, rng, around=profiled)
    intervals = cuda_intervals(seen["prof"])
    timeline = gpu_timeline(intervals, seen["wall_us"])
    return {"step_ms": step_s * 1e3, "busy_ms_a_step": timeline["gpu_busy_ms"] / steps,
            "idle_ms_a_step": timeline["idle_in_span_ms"] / steps, **timeline,
            "kernels_a_step": per_step_kernels(intervals, steps)}


def per_step_kernels(intervals: list[tuple[float, float, str]], steps: int) -> list[dict]:
    """kernel_adds (bench/step_parts.py) of `steps` profiled steps, per step: each kernel's or
    copy's calls, time and share of the critical path (us; the GPU's idle time before an
    activity counts to it), names cut at their arguments."""
    rows = kernel_adds([(start, end, name.split("(")[0][:80]) for start, end, name in intervals])
    return [{"kernel": row["kernel"], "calls": row["calls"] / steps, "us": row["us"] / steps,
             "adds_us": row["adds_us"] / steps} for row in rows]


def prefill_once(engine, tokens: int, rng):
    """A run() that prefills a fresh `tokens`-token prompt in one engine step, then drops it."""
    from shardline.worker.sampling_params import SamplingParams
    vocab = engine.local.model.config.vocab_size

    def run():
        engine.add_request("prefill", rng.integers(0, vocab, tokens).tolist(),
                           SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        engine.step()
        engine.abort("prefill")
        engine.step()
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--kernels", action="store_true", help="also list GPU time by kernel name")
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--ahead-timeline", type=int, default=0, metavar="N",
                   help="instead: N profiles of decode-ahead steps (ahead_timeline) and the graph's replay")
    args = p.parse_args()
    batch = args.batch
    # what build_ours reads; the phases below step the runner one plan at a time
    # (decode ahead on for --ahead-timeline, which profiles only that)
    args.ttft_tokens, args.max_num_seqs, args.batch = 2048, batch, [batch]
    args.decode_ahead = None if args.ahead_timeline else False
    args.gpu_memory_fraction = GPU_MEMORY_FRACTION
    hf = SHAPES[args.shape]
    _, engine = build_ours(hf, args)
    from shardline.worker.sampling_params import SamplingParams
    rng = np.random.default_rng(0)
    if args.ahead_timeline:
        report = {"shape": args.shape, "batch": batch, "ahead_timeline": [
            ahead_timeline(engine, batch, args.context, args.steps, rng) for _ in range(args.ahead_timeline)]}
        report["gpu_graph_replay_s"], report["host_graph_launch_s"] = gpu_forward_s(engine, None, True, rows=batch)
        print(json.dumps(report, indent=1))
        return
    for b in range(batch):
        engine.add_request(f"r{b}", rng.integers(0, hf["vocab_size"], args.context).tolist(),
                           SamplingParams(max_tokens=4 * args.steps + 8, temperature=0.0, ignore_eos=True))
    started: set[str] = set()
    while len(started) < batch:   # every prompt prefilled: the steps from here are pure decodes
        started |= {out.request_id for out in engine.step() if out.new_token_ids}
    report = {"shape": args.shape, "batch": batch, "graphed_phases_s": phases(engine, args.steps)}
    graphs, engine.runner.graphs = engine.runner.graphs, None
    report["eager_phases_s"] = phases(engine, args.steps)
    engine.runner.graphs = graphs
    plan = engine.scheduler.schedule()
    report["gpu_eager_forward_s"], report["host_eager_forward_s"] = gpu_forward_s(engine, plan, graphed=False)
    report["gpu_graph_replay_s"], report["host_graph_launch_s"] = gpu_forward_s(engine, plan, graphed=True)
    try:
        if args.kernels:
            report["decode_kernels"] = kernel_times(lambda: gpu_forward_s(engine, plan, graphed=False, reps=1))
            report["graph_kernels"] = kernel_times(lambda: gpu_forward_s(engine, plan, graphed=True, reps=1))
            engine.scheduler.update_from_output(plan, engine.runner.execute(plan).sampled_token_ids)
            for b in range(batch):
                engine.abort(f"r{b}")
            engine.step()
            report["prefill_kernels"] = kernel_times(prefill_once(engine, args.prefill_tokens, rng), reps=2)
            report["prefill_timeline"] = [prefill_timeline(engine, args.prefill_tokens, rng) for _ in range(3)]
    finally:
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
