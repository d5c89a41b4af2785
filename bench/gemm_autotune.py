"""cuBLAS's default GEMM (cublasGemmEx) against the cuBLASLt algorithm kernels/gemm_lt.py
measures per shape, on Llama-3-8B's decode GEMMs, one GPU, bf16.

Run:  python -m bench.gemm_autotune --out bench/results/gemm_autotune.json

For each weight [N, K] (QKV, o, gate+up, down, LM head) and token count T it times
CublasGemm.matmul_nt with the tuner off (the baseline) and on (after the call that tunes
the shape): --reps calls captured in one CUDA graph, so the host's launch cost is left out
as in a graphed decode step, timed with CUDA events over a replay. The calls cycle
through copies of the weight that together exceed 3x the L2 cache, so each call reads its
weight from HBM. Reports GB/s of weight bytes against the device's copy ceiling (bytes
read + written by a 1 GiB copy, as bench/llm.py measures it) and tuned / default speed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tp_decode import gpu_seconds, graph_seconds  # noqa: E402  (bench/llm.py's timers)
from tables import print_markdown_table  # noqa: E402

WEIGHTS = {   # Llama-3-8B: name -> (N, K) of weight [N, K]
    "qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
    "lm_head": (128256, 4096),
}
TOKENS = (1, 16, 64, 128, 256)
GIB = 1 << 30


def random_bf16(shape: tuple[int, ...], scale: float):
    """bf16 bit patterns (uint16) of normal values times scale, truncated: enough for timing."""
    import cupy
    values = cupy.random.standard_normal(shape, dtype=cupy.float32) * scale   # [*shape]
    return (values.view(cupy.uint32) >> 16).astype(cupy.uint16)


def copy_ceiling_GBps() -> float:
    """Bytes read + written a second by a 1 GiB copy, timed as bench/llm.py times it."""
    import cupy
    src, dst = cupy.ones(GIB // 2, dtype=cupy.uint16), cupy.empty(GIB // 2, dtype=cupy.uint16)
    return 2 * GIB / gpu_seconds(lambda: cupy.copyto(dst, src)) / 1e9


def time_gemm(gemm, x, weights: list, out, reps: int) -> float:
    """Seconds per matmul_nt, the calls cycling through the weight copies."""
    calls = itertools.count()

    def run():
        gemm.matmul_nt(x, weights[next(calls) % len(weights)], out)
    for w in weights:   # tune (when on) on the first copy; the rest share its key
        gemm.matmul_nt(x, w, out)
    return graph_seconds(run, reps)


def tuned_choice(gemm, tokens: int, n: int, k: int) -> str:
    for key, record in gemm.tuner.records.items():
        if key[:3] == (tokens, n, k) and not key[4]:
            return f"{record.choice} ({record.num_candidates} candidates)"
    return "gemm_ex (untuned)"


def measure(args) -> dict:
    import cupy
    from shardline.kernels.gemm import CublasGemm
    default, tuned = CublasGemm(autotune=False), CublasGemm(autotune=True)
    tuned.tuner.include_gemm_ex = not args.lt_only
    l2_bytes = cupy.cuda.Device().attributes["L2CacheSize"]
    report = {"device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), "dtype": "bfloat16",
              "reps": args.reps, "lt_only": args.lt_only, "copy_GBps": copy_ceiling_GBps(), "rows": []}
    for name, (n, k) in WEIGHTS.items():
        weight_bytes = n * k * 2
        copies = max(1, math.ceil(3 * l2_bytes / weight_bytes))
        weights = [random_bf16((n, k), 1 / math.sqrt(k)) for _ in range(copies)]   # [N, K] each
        for tokens in args.tokens:
            x = random_bf16((tokens, k), 1.0)                    # [T, K]
            out = cupy.empty((tokens, n), dtype=cupy.uint16)     # [T, N]
            default_s = time_gemm(default, x, weights, out, args.reps)
            tuned_s = time_gemm(tuned, x, weights, out, args.reps)
            report["rows"].append({
                "weight": name, "N": n, "K": k, "T": tokens, "default_us": default_s * 1e6,
                "tuned_us": tuned_s * 1e6, "default_GBps": weight_bytes / default_s / 1e9,
                "tuned_GBps": weight_bytes / tuned_s / 1e9, "speedup": default_s / tuned_s,
                "choice": tuned_choice(tuned, tokens, n, k)})
            print(json.dumps(report["rows"][-1]), flush=True)
        del weights
        cupy.get_default_memory_pool().free_all_blocks()
    default.close()
    tuned.close()
    return report


def print_table(report: dict) -> None:
    print(f"\n{report['device']}, {report['dtype']}, weight GB/s (copy ceiling {report['copy_GBps']:.0f} GB/s), "
          f"{report['reps']} calls graphed\n")
    print_markdown_table(
        ["weight", "N x K", "T", "default us", "default GB/s", "tuned us", "tuned GB/s", "tuned / default", "choice"],
        [[r["weight"], f"{r['N']} x {r['K']}", r["T"], f"{r['default_us']:.1f}", f"{r['default_GBps']:.0f}",
          f"{r['tuned_us']:.1f}", f"{r['tuned_GBps']:.0f}", f"{r['speedup']:.2f}", r["choice"]]
         for r in report["rows"]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=lambda s: [int(v) for v in s.split(",")], default=list(TOKENS))
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--lt-only", action="store_true", help="the tuner picks among cuBLASLt's candidates only")
    p.add_argument("--out", default=None, help="JSON path")
    args = p.parse_args()
    report = measure(args)
    print_table(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
