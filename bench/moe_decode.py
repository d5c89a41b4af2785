"""Decode throughput of a Mixtral-shaped random model on two GPUs: experts
spread whole over the ranks with all-to-all dispatch (tp=2 attention, ep=2)
vs experts sliced by tensor parallelism (tp=2), at several batch sizes, with
the all-to-all time per step measured separately.

Run one layout:  mpiexec -n 2 python -m mpi4py bench/moe_decode.py --run --ep 2 --out r.json
Compare:         python bench/moe_decode.py --compare            (starts mpiexec per layout; prints a table)

Layers are cut (--layers) so the random model fits and loads quickly; the
per-step numbers scale with the layer count. Each decode step is the whole
eager engine step (plan broadcast, forward, sampling, host readback),
timed on rank 0 after one prefill of --context tokens per request. The
all-to-all row replays one decode step's exchanges (per MoE layer: the
count all_gather and two all_to_all_v of the routed rows) with CUDA events.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import MIXTRAL_8X7B  # noqa: E402
from tp_decode import time_decode  # noqa: E402  (same step loop)

MIXTRAL = MIXTRAL_8X7B


def build(args):
    from shardline.models.config import parse_llama
    from shardline.models.mixtral import MixtralForCausalLM
    from shardline.models.random_checkpoint import RandomCheckpoint
    from shardline.models.weights import WeightReader
    from shardline.worker.group import create_group
    from shardline.worker.model_runner import ModelRunner
    group = create_group("cuda", "bfloat16", list(range(8)), ep=args.ep)
    hf = {**MIXTRAL, "num_hidden_layers": args.layers}
    start = time.perf_counter()
    reader = WeightReader(RandomCheckpoint(hf), group.backend, show_progress=False)
    extra = {"ep": group.ep} if args.ep > 1 else {}
    model = MixtralForCausalLM(group.backend, parse_llama(hf), reader, group.tp, **extra)
    load_s = time.perf_counter() - start
    num_blocks = -(-(args.context + args.steps + 8) // 16) * args.batch + 4
    return group, model, ModelRunner(model, num_blocks, 16), load_s


def time_all_to_all(args, group, reps: int = 20) -> float:
    import cupy
    comm, size = group.ep.comm, group.ep.size
    share = -(-args.batch // size)
    rows = share * MIXTRAL["num_experts_per_tok"]
    send = cupy.zeros((rows, MIXTRAL["hidden_size"]), dtype=cupy.uint16)
    counts = [rows // size + (1 if r < rows % size else 0) for r in range(size)]
    counts_dev = cupy.zeros(MIXTRAL["num_local_experts"], dtype=cupy.int64)

    def one_step():
        for _ in range(args.layers):
            comm.all_gather(counts_dev, axis=0)
            got, _ = comm.all_to_all_v(send, counts, counts)
            comm.all_to_all_v(got, counts, counts)

    one_step()
    cupy.cuda.get_current_stream().synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        one_step()
    cupy.cuda.get_current_stream().synchronize()
    return (time.perf_counter() - start) / reps


def run(args) -> None:
    import faulthandler
    from shardline.worker.group import follow
    faulthandler.dump_traceback_later(args.watchdog_s, exit=True)
    group, model, runner, load_s = build(args)
    times = time_decode(args, group, runner, model) if group.is_leader else follow(group, runner)
    a2a_s = time_all_to_all(args, group) if args.ep > 1 else 0.0
    if group.is_leader:
        import cupy
        result = {"layout": f"tp=2 ep={args.ep}", "layers": args.layers, "batch": args.batch,
                  "device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                  "step_ms_median": 1000 * float(np.median(times)),
                  "tokens_per_s": args.batch / float(np.median(times)), "all_to_all_ms_per_step": 1000 * a2a_s,
                  "load_s": load_s}
        Path(args.out).write_text(json.dumps(result))
        print(json.dumps(result), flush=True)


def compare(args) -> None:
    rows = []
    for ep in (1, 2):
        for batch in (int(b) for b in args.batches.split(",")):
            out = Path(args.results) / f"moe_decode_ep{ep}_b{batch}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            cmd = ["mpiexec", "-n", "2", sys.executable, "-m", "mpi4py", __file__, "--run", "--ep", str(ep),
                   "--batch", str(batch), "--layers", str(args.layers), "--steps", str(args.steps),
                   "--context", str(args.context), "--out", str(out), "--watchdog-s", str(args.watchdog_s)]
            subprocess.run(cmd, check=True, env={**os.environ, "NCCL_NVLS_ENABLE": "0", "PYTHONUNBUFFERED": "1"})
            rows.append(json.loads(out.read_text()))
    print("\n| layout | device | layers | batch | step ms (median) | tokens/s | all-to-all ms/step |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['device']} | {r['layers']} | {r['batch']} | {r['step_ms_median']:.2f} | "
              f"{r['tokens_per_s']:.1f} | {r['all_to_all_ms_per_step']:.3f} |")
    (Path(args.results) / "moe_decode.json").write_text(json.dumps(rows, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="store_true")
    p.add_argument("--compare", action="store_true")
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--out", default="moe_decode.json")
    p.add_argument("--results", default="bench/results")
    p.add_argument("--watchdog-s", type=float, default=150.0)
    args = p.parse_args()
    run(args) if args.run else compare(args)


if __name__ == "__main__":
    main()
