"""Decode step time of a Llama-3-8B-shaped random model, tp=1 vs tp=2 (or more),
with the NCCL all-reduce time per step measured separately.

Run one size:   mpiexec -n 2 python -m mpi4py bench/tp_decode.py --run --out result-tp2.json
Compare sizes:  python bench/tp_decode.py --compare 1,2   (starts mpiexec for each; prints a table)

Each run builds the model from a RandomCheckpoint (no files), prefills one
request of --context tokens, then times --steps decode steps of the whole
engine step path (plan broadcast, forward, sampling, host readback) on rank
0. The communication row replays exactly the collectives one decode step
issues (2 all-reduces of [batch, hidden] per layer, one all-gather of the
logits) in a loop, timed with CUDA events.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import LLAMA3_8B  # noqa: E402


def build(args):
    from shardline.models.config import parse_llama
    from shardline.models.llama import LlamaForCausalLM
    from shardline.models.random_checkpoint import RandomCheckpoint
    from shardline.models.weights import WeightReader
    from shardline.worker.group import create_group
    from shardline.worker.model_runner import ModelRunner

    group = create_group("cuda", "bfloat16", list(range(8)))
    hf = {**LLAMA3_8B, "num_hidden_layers": args.layers}
    start = time.perf_counter()
    reader = WeightReader(RandomCheckpoint(hf), group.backend, show_progress=False)
    model = LlamaForCausalLM(group.backend, parse_llama(hf), reader, group.tp)
    load_s = time.perf_counter() - start
    num_blocks = -(-(args.context + args.steps + 8) // 16) * args.batch + 4
    runner = ModelRunner(model, num_blocks, 16)
    if args.graphs:   # every rank captures the same decode steps, NCCL collectives inside
        runner.enable_cuda_graphs(args.batch, 8192)
    return group, model, runner, load_s


def time_decode(args, group, runner, model):
    from shardline.worker.block_manager import BlockManager
    from shardline.worker.group import BroadcastingRunner
    from shardline.worker.request import Request
    from shardline.worker.sampling_params import SamplingParams
    from shardline.worker.scheduler import Scheduler
    from shardline.worker.scheduler_config import SchedulerConfig

    leader = BroadcastingRunner(group, runner)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=args.context * args.batch, max_num_seqs=args.batch,
                                          max_model_len=8192, block_size_tokens=16), BlockManager(runner.kv.num_blocks, 16))
    rng = np.random.default_rng(0)
    for b in range(args.batch):
        scheduler.add_request(Request(request_id=f"r{b}", prompt_token_ids=rng.integers(0, model.config.vocab_size, args.context).tolist(),
                                      params=SamplingParams(max_tokens=args.steps + 2, temperature=0.0, ignore_eos=True)))
    times = []
    for step in range(args.steps + 1):
        plan = scheduler.schedule()
        start = time.perf_counter()
        result = leader.execute(plan)  # sampling reads tokens back: the step is finished here
        elapsed = time.perf_counter() - start
        scheduler.update_from_output(plan, result.sampled_token_ids)
        if step > 0:  # step 0 is the prefill
            times.append(elapsed)
    leader.shutdown()
    replays = runner.graphs.num_replays if runner.graphs is not None else 0
    runner.close()   # graphs go before the communicator (NCCL waits on graphs holding its work)
    return times, replays


def time_collectives(args, group, reps=50):
    import cupy
    hidden = cupy.zeros((args.batch, 4096), dtype=cupy.uint16)
    logits = cupy.zeros((args.batch, -(-128256 // group.tp.size)), dtype=cupy.uint16)

    def one_step():
        for _ in range(2 * args.layers):
            group.tp.comm.all_reduce(hidden)
        group.tp.comm.all_gather(logits, axis=-1)

    return gpu_seconds(one_step, reps)


def cuda_intervals(prof) -> list[tuple[float, float, str]]:
    """(start, end, name) in us of every GPU activity a torch.profiler run recorded (kernels,
    copies, cupy's launches too)."""
    return [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
            if str(e.device_type).endswith("CUDA") and e.time_range.end > e.time_range.start]


def gpu_seconds(run, reps: int = 10) -> float:
    """Seconds of GPU time per call of `run` (after one warm-up call), by CUDA events."""
    import cupy
    run()
    begin, end = cupy.cuda.Event(), cupy.cuda.Event()
    begin.record()
    for _ in range(reps):
        run()
    end.record()
    end.synchronize()
    return cupy.cuda.get_elapsed_time(begin, end) / 1000 / reps


@contextlib.contextmanager
def captured_graph(run, reps: int = 1):
    """One CUDA graph of `reps` calls of `run`, captured after a warm-up call (the memory pool of
    its own then holds every block the capture needs) on a stream of its own: yields (graph,
    stream), the pool and the stream still current."""
    import cupy
    # The stream below does not wait for the default stream: the inputs' writes must be done.
    cupy.cuda.Device().synchronize()
    pool, stream = cupy.cuda.MemoryPool(), cupy.cuda.Stream(non_blocking=True)
    with cupy.cuda.using_allocator(pool.malloc), stream:
        run()
        stream.begin_capture()
        try:
            for _ in range(reps):
                run()
        finally:
            graph = stream.end_capture()
        yield graph, stream


def graph_seconds(run, reps: int = 20) -> float:
    """Seconds of GPU time per call of `run`, replayed from one CUDA graph of `reps` calls, so
    the host's launch cost (tens of us for a small kernel) stays out of the figure."""
    import cupy
    with captured_graph(run, reps) as (graph, stream):
        graph.launch(stream)
        begin, end = cupy.cuda.Event(), cupy.cuda.Event()
        begin.record(stream)
        graph.launch(stream)
        end.record(stream)
        end.synchronize()
    return cupy.cuda.get_elapsed_time(begin, end) / 1000 / reps


def run(args) -> None:
    import faulthandler
    from shardline.worker.group import follow
    faulthandler.dump_traceback_later(args.watchdog_s, exit=True)  # a hung collective shows where
    group, model, runner, load_s = build(args)
    print(f"rank {group.rank}: loaded in {load_s:.1f} s", file=sys.stderr, flush=True)
    if group.is_leader:
        times, replays = time_decode(args, group, runner, model)
    else:
        follow(group, runner)
    comm_s = time_collectives(args, group) if group.tp.size > 1 else 0.0
    if group.is_leader:
        import cupy
        result = {"tp": group.tp.size, "layers": args.layers, "batch": args.batch, "context": args.context,
                  "cuda_graphs": args.graphs, "graph_replays": replays,
                  "device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                  "step_ms_median": 1000 * float(np.median(times)), "step_ms_p90": 1000 * float(np.percentile(times, 90)),
                  "allreduce_ms_per_step": 1000 * comm_s, "load_s": load_s}
        Path(args.out).write_text(json.dumps(result))
        print(json.dumps(result), flush=True)


def compare(args) -> None:
    rows = []
    for tp in [int(t) for t in args.compare.split(",")]:
        out = Path(args.results) / f"tp_decode_tp{tp}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = ["mpiexec", "-n", str(tp), sys.executable, "-m", "mpi4py", __file__, "--run", "--out", str(out),
               "--layers", str(args.layers), "--steps", str(args.steps), "--context", str(args.context),
               "--batch", str(args.batch), "--watchdog-s", str(args.watchdog_s)] + ["--graphs"] * args.graphs
        subprocess.run(cmd, check=True, env={**os.environ, "NCCL_NVLS_ENABLE": "0", "PYTHONUNBUFFERED": "1"})
        rows.append(json.loads(out.read_text()))
    print("\n| tp | device | graphs | layers | batch | context | step ms (median) | p90 | NCCL ms/step | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tp']} | {r['device']} | {r.get('graph_replays', 0)} replays | {r['layers']} | {r['batch']} | "
              f"{r['context']} | "
              f"{r['step_ms_median']:.2f} | {r['step_ms_p90']:.2f} | {r['allreduce_ms_per_step']:.3f} | "
              f"{rows[0]['step_ms_median'] / r['step_ms_median']:.2f}x |")
    (Path(args.results) / "tp_decode.json").write_text(json.dumps(rows, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="store_true")
    p.add_argument("--compare", default=None, help="comma-separated tp sizes, e.g. 1,2")
    p.add_argument("--out", default="tp_decode.json")
    p.add_argument("--results", default="bench/results")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--graphs", action="store_true", help="replay decode steps from CUDA graphs (NCCL inside)")
    p.add_argument("--watchdog-s", type=float, default=240.0, help="dump stacks and exit if a run takes longer")
    args = p.parse_args()
    run(args) if args.run else compare(args)


if __name__ == "__main__":
    main()
