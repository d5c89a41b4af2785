"""Where a decode step's GPU time goes: a dense model's decode step built from the backend's ops
(random weights, the paged cache at --context tokens), timed with parts of it left out.

Run:  python -m bench.step_parts --shape llama3-8b --batch 1,2,4 \\
          --config 'plain={}' --config 'looped={"skinny_blocks_per_sm": 3}'

The parts add up in this order, each timed as a whole step (so each row's difference to the
row before is what that part costs in the step, overlaps included):
- gemms: every projection (QKV, O, gate/up with the SiLU gate, down, LM head), each fed the
  one before;
- +norms: the RMSNorms with their residual adds;
- +attention: paged attention over the cache;
- +rope: RoPE and the cache write, fused into QKV where the ops fuse them (the engine's step).
On CUDA each step is one CUDA graph with dependent launches (as the engine captures it) and
the device's read rate (a streaming read kernel) is measured in the same run; on NumPy the
steps run eagerly (a smoke test of the tool). --config NAME=JSON sets CudaOps attributes as
bench.decode_ab does; settings alternate within each rep. Writes JSON rows and prints a table
with the weights' read rate of each step.

With --timeline (CUDA) it also profiles one replay of each batch's whole step (torch.profiler,
which sees cupy's launches) and lists, per kernel name, its calls, its time and what it adds:
its end minus the end of the kernel before it, its share of the step's critical path. With
dependent launches a kernel starts before the one before it ends, so its own time overstates
what it costs the step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from shardline.kernels import numpy_ops
from shardline.models.layers import RowParallelLinear
from shardline.parallel.sharding import TensorParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_ab import Settings  # noqa: E402
from shapes import SHAPES  # noqa: E402
from tp_decode import captured_graph, cuda_intervals, graph_seconds  # noqa: E402

PARTS = ("gemms", "norms", "attention", "rope")
BLOCK = 16
SINGLE_RANK = TensorParallel()


class SyntheticStep:
    """One decode step of a dense Llama-style model over `batch` sequences of `context` tokens,
    from ops calls: the weights random, every sequence's cache filled, the new token at the end."""

    def __init__(self, backend, hf: dict, batch: int, context: int, seed: int = 0):
        if hf.get("num_local_experts"):
            raise ValueError("step_parts builds dense models only; the shape has experts")
        self.backend, self.ops, xp = backend, backend.ops, backend.xp
        self.hidden, self.heads = hf["hidden_size"], hf["num_attention_heads"]
        self.head_dim = hf.get("head_dim") or self.hidden // self.heads
        kv_heads, inter, layers = hf["num_key_value_heads"], hf["intermediate_size"], hf["num_hidden_layers"]
        self.eps, self.batch = hf["rms_norm_eps"], batch
        rng = np.random.default_rng(seed)
        qkv_rows = (self.heads + 2 * kv_heads) * self.head_dim
        # the engine's norms before QKV and gate/up hand their weights to them (layers.Norm's fold): ones
        ones = self.backend.asarray(np.ones(self.hidden, np.float32))
        self.layers = [dict(norm1=ones, qkv=self._weight(rng, qkv_rows, self.hidden),
                            o=self._weight(rng, self.hidden, self.heads * self.head_dim),
                            norm2=ones, gate_up=self._weight(rng, 2 * inter, self.hidden),
                            down=self._weight(rng, self.hidden, inter)) for _ in range(layers)]
        self.final_norm, self.lm_head = self._weight(rng, self.hidden), self._weight(rng, hf["vocab_size"], self.hidden)
        self.weight_bytes = sum(int(w.nbytes) for layer in self.layers for w in layer.values())
        self.weight_bytes += int(self.lm_head.nbytes + self.final_norm.nbytes)
        blocks = -(-(context + 1) // BLOCK)   # a sequence's blocks, the new token's included
        cache_shape = (batch * blocks, BLOCK, kv_heads, self.head_dim)
        self.k_caches = [self._weight(rng, *cache_shape) for _ in range(layers)]
        self.v_caches = [self._weight(rng, *cache_shape) for _ in range(layers)]
        self.block_tables = xp.asarray(np.arange(batch * blocks, dtype=np.int32).reshape(batch, blocks))
        self.seq_lens = xp.asarray(np.full(batch, context + 1, dtype=np.int32))
        self.query_start_loc = xp.asarray(np.arange(batch + 1, dtype=np.int32))
        self.positions = xp.asarray(np.full(batch, context, dtype=np.int64))
        self.slots = xp.asarray(np.arange(batch, dtype=np.int64) * blocks * BLOCK + context)
        from shardline.kernels.rope import rope_cos_sin
        self.cos_sin = xp.asarray(rope_cos_sin(self.head_dim, context + 1, hf["rope_theta"]).astype(np.float32))
        self.x = self._weight(rng, batch, self.hidden)

    def _weight(self, rng, *shape):
        """Random values in the backend's storage dtype. On CUDA drawn on the device as bf16 bits
        of magnitudes 2^-7 to 2^-6, either sign (only the time counts there, and a Llama-3-8B's
        15 GB would not fit the host as float32); on NumPy normal, over the square root of the
        fan-in for a matrix, so every part of the step shows in its output."""
        if self.backend.name == "cuda":
            import cupy
            bits = cupy.random.randint(0x3C00, 0x3D00, size=shape, dtype=cupy.int32).astype(cupy.uint16)
            return bits | (cupy.random.randint(0, 2, size=shape, dtype=cupy.int32).astype(cupy.uint16) << 15)
        scale = shape[-1] ** -0.5 if len(shape) == 2 else 1.0
        return self.backend.asarray((rng.standard_normal(shape) * scale).astype(np.float32))

    def forward(self, parts: set[str]):
        """The step's logits with only `parts` of PARTS in it (gemms always)."""
        ops, eps, rows = self.ops, self.eps, self.batch
        # a fresh stream each step, as the engine's embedding gives (the GEMMs may sum into it)
        x, residual = self.x.copy(), None
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = self.k_caches[i], self.v_caches[i]
            if "rope" in parts:   # the engine's QKV: norm, projection, RoPE and cache write, fused where they fuse
                q, residual = ops.rms_norm_qkv_rope(x, layer["norm1"], eps, residual, layer["qkv"], None,
                                                    self.positions, self.cos_sin, self.heads, k_cache, v_cache,
                                                    self.slots, folded=True)
            else:
                if "norms" in parts:
                    h, residual = numpy_ops.rms_norm_residual(x, layer["norm1"], eps, residual, ops)
                else:
                    h = x
                q = ops.linear(h, layer["qkv"])[:, :self.heads * self.head_dim]
            if "attention" in parts:
                q = ops.paged_attention(q.reshape(rows, self.heads, self.head_dim), k_cache, v_cache,
                                        self.block_tables, self.seq_lens, self.query_start_loc,
                                        self.head_dim ** -0.5, one_query_each=True).reshape(rows, -1)
            o = self.backend.xp.ascontiguousarray(q)
            if "norms" in parts:   # as the engine's blocks: o and down summed into the residual where that pays
                x, residual = RowParallelLinear(self.backend, SINGLE_RANK, layer["o"]).add_to(o, residual)
                h, residual = ops.rms_norm_linear(x, layer["norm2"], eps, residual, layer["gate_up"], gated=True,
                                                  folded=True)
                down = RowParallelLinear(self.backend, SINGLE_RANK, layer["down"])
                x, residual = down.add_to(h, residual)
            else:
                x = ops.linear(ops.gated_linear(ops.linear(o, layer["o"]), layer["gate_up"]), layer["down"])
        if "norms" in parts:
            x = numpy_ops.rms_norm_residual(x, self.final_norm, eps, residual, ops)[0]
        return ops.linear(x, self.lm_head)


def step_seconds(step: SyntheticStep, parts: set[str], reps: int = 5) -> float:
    """Seconds of one step: on CUDA replayed from one graph of `reps` steps with dependent
    launches; on NumPy the median of `reps` eager steps."""
    if step.backend.name == "cuda":
        def run():
            with step.ops.dependent_launches():
                step.forward(parts)
        return graph_seconds(run, reps=reps)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step.forward(parts)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def kernel_adds(intervals: list[tuple[float, float, str]]) -> list[dict]:
    """Per kernel name, from one replay's kernels (start, end, name; any time unit, us here):
    calls, their summed time, and what they add to the critical path (each one's end minus the
    latest end before it, 0 where it ends inside an earlier one), largest first."""
    rows: dict[str, dict] = {}
    last_end = None
    for start, end, name in sorted(intervals):
        row = rows.setdefault(name, {"kernel": name, "calls": 0, "us": 0.0, "adds_us": 0.0})
        row["calls"] += 1
        row["us"] += end - start
        row["adds_us"] += max(0.0, end - (start if last_end is None else last_end))
        last_end = end if last_end is None else max(last_end, end)
    return sorted(rows.values(), key=lambda r: -r["adds_us"])


def timeline(step: SyntheticStep) -> dict:
    """kernel_adds of one replay of the whole step, captured as step_seconds captures it."""
    from torch.profiler import ProfilerActivity, profile

    def run():
        with step.ops.dependent_launches():
            step.forward(set(PARTS))
    with captured_graph(run) as (graph, stream):
        graph.launch(stream)
        stream.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graph.launch(stream)
            stream.synchronize()
    kernels = [(start, end, name.split("(")[0][:80]) for start, end, name in cuda_intervals(prof)]
    if not kernels:
        raise RuntimeError("timeline: the profiler saw no kernel of the replay")
    span = max(end for _, end, _ in kernels) - min(start for start, _, _ in kernels)
    return {"span_us": round(span, 2), "kernels": kernel_adds(kernels)}


def read_rate_GBps() -> float:
    """The device's streaming read rate: a kernel summing 1 GiB in 16-byte loads past L1."""
    import cupy
    kernel = cupy.RawKernel(r"""
extern "C" __global__ void read_all(const uint4* p, long long n, unsigned* out) {
    unsigned acc = 0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const uint4 v = __ldcs(p + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9e3779b9u) out[0] = acc;   // keeps the loads
}""", "read_all")
    data, out = cupy.zeros(1 << 30, dtype=cupy.uint8), cupy.zeros(1, dtype=cupy.uint32)
    blocks = 8 * cupy.cuda.Device().attributes["MultiProcessorCount"]
    seconds = graph_seconds(lambda: kernel((blocks,), (256,), (data, np.int64(data.size // 16), out)), reps=10)
    return data.size / seconds / 1e9


def run(args) -> list[dict]:
    from shardline.kernels.backend import create_backend
    backend = create_backend(args.backend, "bfloat16" if args.backend == "cuda" else "float32")
    hf = SHAPES[args.shape] if isinstance(args.shape, str) else args.shape
    settings = Settings(backend.ops, args.config or ["default={}"])
    read = read_rate_GBps() if backend.name == "cuda" else None
    rows = []
    for batch in args.batch:
        step = SyntheticStep(backend, hf, batch, args.context)
        for n in range(1, len(PARTS) + 1):   # new shapes' K splits timed here, with plain launches (as the
            step.forward(set(PARTS[:n]))      # engine's first, eager steps time them), not in the graphs' warm-up
        for n in range(1, len(PARTS) + 1):
            parts = set(PARTS[:n])
            times: dict[str, list[float]] = {name: [] for name in settings.configs}
            for _ in range(args.reps):
                for name in settings.configs:
                    settings.apply(name)
                    times[name].append(step_seconds(step, parts))
            for name, seconds in times.items():
                s = float(np.median(seconds))
                rows.append({"shape": args.shape if isinstance(args.shape, str) else "custom", "batch": batch,
                             "parts": "+".join(PARTS[:n]), "config": name, "step_ms": round(s * 1e3, 4),
                             "all_ms": [round(t * 1e3, 4) for t in seconds],
                             "weights_TBps": round(step.weight_bytes / s / 1e12, 3), "read_GBps": read})
        if getattr(args, "timeline", False) and backend.name == "cuda":
            settings.apply(next(iter(settings.configs)))
            rows.append({"shape": args.shape if isinstance(args.shape, str) else "custom", "batch": batch,
                         "parts": "timeline", "config": next(iter(settings.configs)), **timeline(step)})
        del step
    return rows


def print_table(rows: list[dict]) -> None:
    print("| shape | batch | parts | config | step (ms) | part (ms) | weights read (TB/s) |")
    print("|---|---|---|---|---|---|---|")
    before: dict[tuple, float] = {}
    for r in rows:
        if r["parts"] == "timeline":
            continue
        key = (r["shape"], r["batch"], r["config"])
        part = "" if key not in before else f"{r['step_ms'] - before[key]:+.3f}"
        before[key] = r["step_ms"]
        print(f"| {r['shape']} | {r['batch']} | {r['parts']} | {r['config']} | {r['step_ms']:.3f} | {part} | "
              f"{r['weights_TBps']:.3f} |")
    if rows and rows[0]["read_GBps"]:
        print(f"\ndevice read rate: {rows[0]['read_GBps']:.0f} GB/s")
    for r in rows:
        if r["parts"] == "timeline":
            print(f"\n{r['shape']}, batch {r['batch']}, config {r['config']}: one replay spans {r['span_us']:.1f} us")
            print("| kernel | calls | us | adds (us) | adds a call (us) |")
            print("|---|---|---|---|---|")
            for k in r["kernels"]:
                print(f"| {k['kernel']} | {k['calls']} | {k['us']:.1f} | {k['adds_us']:.1f} | "
                      f"{k['adds_us'] / k['calls']:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--config", action="append", help="NAME=JSON of CudaOps attributes (default: one, as built)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--backend", default="cuda", choices=["cuda", "numpy"])
    p.add_argument("--timeline", action="store_true", help="CUDA: each kernel's share of one replay's critical path")
    p.add_argument("--out", default="bench/results/step_parts.json")
    args = p.parse_args()
    rows = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print_table(rows)


if __name__ == "__main__":
    main()
