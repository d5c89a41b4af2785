"""One-GPU engine benchmark: our engine against the GPU's two ceilings and HF transformers, in one run.

Run:  python -m bench.llm --shapes llama3-8b,smollm2-135m --batch 1,16,64 --out bench/results/llm.json

For each model shape of bench/shapes.py (Llama-3-8B, Llama-3-70B and
Mixtral-8x7B cut to fewer layers, SmolLM2-135M; random weights:
RandomCheckpoint for ours, a random transformers model for HF, bf16, no
files) it measures, on the same GPU and in the same run as the ceilings
(copy bandwidth, bf16 GEMM rate):
- decode step time per batch size (whole engine step: plan, forward,
  sampling, token readback; CUDA graphs, and batch 1 eager too) at
  --context tokens, against the roofline (shapes.decode_step_seconds: the
  matmuls at the slower of their weight bytes at the measured copy rate and
  their FLOPs at the measured GEMM rate, then the KV bytes at the copy rate);
  greedy, and at batch 1 also sampled as a chat client asks (SAMPLED: temperature,
  top-k and top-p, drawn on the device), against the same roofline;
- TTFT of a prompt of each --ttft-tokens length (the median of TTFT_REPS; a length is cut
  to the shape's positions less the 2 tokens the request asks for: Llama-3's 8192 gives
  8190) and its prefill rate in prompt tokens/s, against the compute bound (2 x parameters
  x tokens + causal attention FLOPs / measured GEMM rate);
- offline throughput of --offline-requests requests of 128 in / 128 out, at most
  --max-num-seqs running at once, against a bound (shapes.offline_seconds: prefills at
  the GEMM rate plus the decode waves' steps at their roofline), and where its time went
  (offline_run);
- HF transformers eager (torch bf16, KV cache) batch-1 decode step and TTFT;
- the engine's peak device memory beside its weight and KV cache sizes.
MoE rooflines count the experts a batch's tokens are expected to touch.
Writes JSON and prints a markdown table with the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_transfer import TTFT_MAX_TOKENS, mixed_ttft  # noqa: E402  (TTFT through the engine)
from shapes import SHAPES, offline_seconds, rooflines  # noqa: E402
from tp_decode import gpu_seconds  # noqa: E402

GIB = 1 << 30
OFFLINE_TOKENS = 128   # prompt and output tokens a request of the offline run
GPU_MEMORY_FRACTION = 0.5   # of the free memory after the weights, for the KV cache
TTFT_REPS = 5   # the TTFT reported is their median, after one warm-up


def ceilings(backend) -> dict:
    import cupy
    src, dst = cupy.ones(GIB // 2, dtype=cupy.uint16), cupy.empty(GIB // 2, dtype=cupy.uint16)
    copy_s = gpu_seconds(lambda: cupy.copyto(dst, src))
    n = 8192
    rng = np.random.default_rng(0)
    x, w = (backend.asarray(rng.standard_normal((n, n), dtype=np.float32)) for _ in range(2))
    gemm_s = gpu_seconds(lambda: backend.ops.linear(x, w))
    return {"copy_GBps": 2 * GIB / copy_s / 1e9, "gemm_TFLOPs": 2 * n ** 3 / gemm_s / 1e12}


def build_ours(hf: dict, args):
    from shardline.kernels.backend import create_backend
    from shardline.models.random_checkpoint import RandomCheckpoint
    from shardline.models.registry import lookup
    from shardline.models.weights import WeightReader
    from shardline.worker.engine import EngineConfig, LLMEngine
    from shardline.worker.offline import LocalModel
    backend = create_backend("cuda", "bfloat16")
    architecture = lookup(hf, "bench")
    model = architecture.model_class(backend, architecture.parse(hf),
                                     WeightReader(RandomCheckpoint(hf), backend, False))
    longest = int(np.max(args.ttft_tokens))   # one length (decode_ab, step_profile) or bench.llm's list
    config = EngineConfig(backend="cuda", dtype="bfloat16", max_num_batched_tokens=max(longest, 8192),
                          decode_ahead=args.decode_ahead,   # None: the engine's default (on for one GPU)
                          max_num_seqs=max(args.batch + [args.max_num_seqs]),
                          gpu_memory_fraction=args.gpu_memory_fraction,
                          enable_prefix_caching=False)
    return backend, LLMEngine(config, LocalModel(model, None))


# The sampled decode row's parameters: what a chat client commonly sends (the others are greedy).
SAMPLED = {"temperature": 0.8, "top_k": 50, "top_p": 0.9}


def ttft_lengths(hf: dict, requested: list[int]) -> list[int]:
    """The prompt lengths TTFT is read at: each requested one, cut to what fits the shape's
    positions beside the tokens mixed_ttft's request asks for."""
    return sorted({min(n, hf["max_position_embeddings"] - TTFT_MAX_TOKENS) for n in requested})


def median_ttft(engine, prompt: list[int], reads: int) -> tuple[float, list[float]]:
    """The median TTFT of `prompt` through the engine and its reads, after a warm-up (one read
    swings by +-3 ms)."""
    mixed_ttft(engine, prompt)
    seconds = [mixed_ttft(engine, prompt) for _ in range(reads)]
    return float(np.median(seconds)), seconds


def decode_step_s(engine, batch: int, context: int, steps: int, rng, sampling: dict | None = None,
                  around=contextlib.nullcontext) -> float:
    """Median wall seconds of an engine step decoding `batch` requests of `context` tokens,
    greedy or with `sampling`'s SamplingParams fields. The timed steps run inside `around()`
    (a context manager: a profiler, say)."""
    from shardline.worker.sampling_params import SamplingParams
    # The first requests decode a token a step while the later ones prefill: enough tokens for all.
    prefill_steps = -(-batch * context // engine.config.max_num_batched_tokens)
    params = SamplingParams(max_tokens=steps + prefill_steps + 4, ignore_eos=True,
                            **(sampling or {"temperature": 0.0}))
    ids = [f"d{b}" for b in range(batch)]
    for rid in ids:
        engine.add_request(rid, rng.integers(0, engine.local.model.config.vocab_size, context).tolist(), params)
    started: set[str] = set()
    while len(started) < batch:   # every prompt prefilled and its first token out
        started |= {out.request_id for out in engine.step() if out.new_token_ids}
    times = []
    with around():
        for _ in range(steps):
            begin = time.perf_counter()
            outputs = engine.step()
            times.append(time.perf_counter() - begin)
            if len(outputs) != batch:
                raise RuntimeError(f"decode step of batch {batch}: {len(outputs)} requests got a token")
    for rid in ids:
        engine.abort(rid)
    engine.step()
    return float(np.median(times))


def offline_run(engine, num_requests: int, rng) -> dict:
    """Offline throughput: num_requests prompts of OFFLINE_TOKENS random tokens, each to
    OFFLINE_TOKENS output tokens (engine.generate). And where the time went: each plan's span
    (from the scheduler taking the previous plan's tokens to taking its own: the plan's GPU
    time while the GPU is the bottleneck, decoding ahead), summed over plans with prompt tokens
    and over decode-only plans; and the host's time in the scheduler, the runner's launch and
    the engine's output stream, which decoding ahead overlaps with the GPU."""
    from shardline.worker.sampling_params import SamplingParams
    vocab = engine.local.model.config.vocab_size
    prompts = [rng.integers(0, vocab, OFFLINE_TOKENS).tolist() for _ in range(num_requests)]
    plans: list[tuple[float, bool, int]] = []   # (tokens taken at, has prompt tokens, rows sampled)
    host: dict[str, float] = {}
    runner_launch = "launch" if hasattr(engine.runner, "launch") else "execute"
    with timed(engine.scheduler, ("schedule", "update_from_output"), host), timed(engine, ("_stream",), host), \
            timed(engine.runner, (runner_launch,), host, "runner_" + runner_launch):
        update = engine.scheduler.update_from_output

        def update_and_note(plan, sampled):
            update(plan, sampled)
            plans.append((time.perf_counter(), bool((np.asarray(plan.num_scheduled_tokens) > 1).any()),
                          int(np.asarray(plan.sample_rows).size)))

        engine.scheduler.update_from_output = update_and_note
        begin = time.perf_counter()
        engine.generate(prompts, SamplingParams(max_tokens=OFFLINE_TOKENS, temperature=0.0, ignore_eos=True))
        total = time.perf_counter() - begin
    spans = np.diff([begin] + [at for at, _, _ in plans])
    prompt = np.array([p for _, p, _ in plans], dtype=bool)
    rows = np.array([r for _, _, r in plans])
    return {"offline_tokens_per_s": OFFLINE_TOKENS * num_requests / total, "offline_s": total,
            "offline_plans": len(plans), "offline_prompt_plans": int(prompt.sum()),
            "offline_prompt_plans_s": float(spans[prompt].sum()), "offline_decode_plans_s": float(spans[~prompt].sum()),
            "offline_decode_rows_mean": float(rows[~prompt].mean()) if (~prompt).any() else 0.0,
            "offline_host_s": host}


@contextlib.contextmanager
def timed(obj, names, spent: dict[str, float], key: str | None = None):
    """obj's methods `names` add their seconds to spent[name] (or spent[key]) while inside;
    the class's methods again after."""
    def timing(name, method):
        def call(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[key or name] = spent.get(key or name, 0.0) + time.perf_counter() - begin
        return call

    for name in names:
        setattr(obj, name, timing(name, getattr(obj, name)))
    try:
        yield spent
    finally:
        for name in names:
            del obj.__dict__[name]


class DeviceMemory:
    """Peak device memory of an engine: free memory read before it is built and after
    each phase (pools only grow while it lives), so weights, KV cache, graph pools,
    cuBLAS workspace and activations all count."""

    def __init__(self):
        import cupy
        self._free = lambda: int(cupy.cuda.runtime.memGetInfo()[0])
        release_device_memory()   # a previous engine's cycles (runner <-> graphs) go now, not mid-run
        self.before, self.lowest = self._free(), None

    def sample(self) -> None:
        free = self._free()
        self.lowest = free if self.lowest is None else min(self.lowest, free)

    @property
    def peak_bytes(self) -> int:
        return self.before - (self.lowest if self.lowest is not None else self.before)


def measure_ours(hf: dict, args, rng) -> dict:
    from shardline.worker.model_runner import kv_bytes_per_block
    memory = DeviceMemory()
    backend, engine = build_ours(hf, args)
    memory.sample()
    result = {"ceilings": ceilings(backend), "decode_s": {},
              "kv_cache_bytes": engine.num_kv_blocks * kv_bytes_per_block(engine.local.model,
                                                                          engine.config.block_size_tokens)}
    graphs, engine.runner.graphs = engine.runner.graphs, None
    result["decode_eager_s_batch1"] = decode_step_s(engine, 1, args.context, args.steps, rng)
    engine.runner.graphs = graphs
    for batch in args.batch:
        result["decode_s"][batch] = decode_step_s(engine, batch, args.context, args.steps, rng)
        memory.sample()
    result["decode_sampled_s_batch1"] = decode_step_s(engine, 1, args.context, args.steps, rng, SAMPLED)
    result["ttft_s"], result["ttft_s_all"] = {}, {}
    for tokens in ttft_lengths(hf, args.ttft_tokens):
        prompt = rng.integers(0, hf["vocab_size"], tokens).tolist()
        result["ttft_s"][tokens], result["ttft_s_all"][tokens] = median_ttft(engine, prompt, TTFT_REPS)
        memory.sample()
    result.update(offline_run(engine, args.offline_requests, rng))
    memory.sample()
    result["peak_device_bytes"] = memory.peak_bytes
    result["skinny_k_splits"] = skinny_k_splits(backend.ops)
    del engine, backend
    release_device_memory()   # room for the HF model
    return result


def skinny_k_splits(ops) -> dict[str, int]:
    """The skinny GEMMs' K splits this process timed, "rows x N x K x gated x dtype" -> split.
    They are picked once a process, and a batch-1 step differs by process with them (session 31:
    4.19 ms with the o projection's one-row split 4, 4.37-4.41 with 1 or 2)."""
    return {"x".join(map(str, key)): split for key, split in getattr(ops, "_skinny_splits", {}).items()}


def release_device_memory() -> None:
    import cupy
    gc.collect()
    cupy.get_default_memory_pool().free_all_blocks()


def measure_hf(hf: dict, args, rng) -> dict:
    import torch
    import transformers
    config = transformers.AutoConfig.for_model(**hf)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = getattr(transformers, hf["architectures"][0])(config).eval()
    torch.set_default_dtype(torch.float32)
    ids = torch.tensor(rng.integers(0, hf["vocab_size"], (1, args.context)), device="cuda")
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(args.steps):
            torch.cuda.synchronize()
            begin = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            token.item()
            times.append(time.perf_counter() - begin)
        ttft = {}
        for tokens in ttft_lengths(hf, args.ttft_tokens):
            prompt = torch.tensor(rng.integers(0, hf["vocab_size"], (1, tokens)), device="cuda")
            reads = []
            for _ in range(1 + TTFT_REPS):   # a warm-up, then as ours
                torch.cuda.synchronize()
                begin = time.perf_counter()
                model(prompt, use_cache=True).logits[:, -1].argmax(-1).item()
                reads.append(time.perf_counter() - begin)
            ttft[tokens] = float(np.median(reads[1:]))
    del model, cache
    torch.cuda.empty_cache()
    return {"decode_s_batch1": float(np.median(times)), "ttft_s": ttft}


def run(args) -> dict:
    import cupy
    rng = np.random.default_rng(0)
    report = {"device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), "context": args.context,
              "ttft_tokens": args.ttft_tokens, "offline_requests": args.offline_requests,
              "max_num_seqs": args.max_num_seqs, "gpu_memory_fraction": args.gpu_memory_fraction,
              "decode_ahead": args.decode_ahead, "shapes": {}}
    for name in args.shapes:
        hf = SHAPES[name]
        ours = measure_ours(hf, args, rng)
        c = ours["ceilings"]
        entry = {"ours": ours, "roofline": rooflines(hf, args.batch, args.context, ttft_lengths(hf, args.ttft_tokens),
                                                     c["copy_GBps"] * 1e9, c["gemm_TFLOPs"] * 1e12)}
        entry["roofline"]["offline_s"] = offline_seconds(
            hf, args.offline_requests, max(args.batch + [args.max_num_seqs]), OFFLINE_TOKENS, OFFLINE_TOKENS,
            c["copy_GBps"] * 1e9, c["gemm_TFLOPs"] * 1e12)
        if not args.skip_hf:
            entry["hf"] = measure_hf(hf, args, rng)
        report["shapes"][name] = entry
        print(f"{name}: done", file=sys.stderr, flush=True)
    return report


def print_table(report: dict) -> None:
    off = f", off: {report['gpu_off']}" if report.get("gpu_off") else ""
    print(f"\n{report['device']}, bf16, decode at {report['context']} tokens of context, "
          f"TTFT of {report['ttft_tokens']} tokens (cut to the shape's positions){off}\n")
    print("| shape | metric | ours | HF eager | roofline | ours / roofline | HF / ours |")
    print("|---|---|---|---|---|---|---|")
    for name, e in report["shapes"].items():
        ours, roof, hf = e["ours"], e["roofline"], e.get("hf", {})
        c = ours["ceilings"]
        print(f"| {name} | ceilings | copy {c['copy_GBps']:.0f} GB/s, GEMM {c['gemm_TFLOPs']:.0f} TFLOP/s | | | | |")
        row(name, "decode step, batch 1, eager (ms)", ours["decode_eager_s_batch1"], hf.get("decode_s_batch1"),
            roof["decode_s"][1])
        for batch, step_s in ours["decode_s"].items():
            hf_s = hf.get("decode_s_batch1") if batch == 1 else None
            row(name, f"decode step, batch {batch}, CUDA graphs (ms)", step_s, hf_s, roof["decode_s"][batch])
        if "decode_sampled_s_batch1" in ours:
            sampled = ", ".join(f"{k} {v}" for k, v in SAMPLED.items())
            row(name, f"decode step, batch 1, CUDA graphs, sampled ({sampled}) (ms)", ours["decode_sampled_s_batch1"],
                None, roof["decode_s"][1])
        for tokens, ttft_s in ours["ttft_s"].items():
            row(name, f"TTFT, {tokens} tokens (ms)", ttft_s, hf.get("ttft_s", {}).get(tokens), roof["ttft_s"][tokens])
            row(name, f"prefill, {tokens} tokens (prompt tok/s)", ttft_s, hf.get("ttft_s", {}).get(tokens),
                roof["ttft_s"][tokens], per=tokens)
        tokens, roof_s = report["offline_requests"] * OFFLINE_TOKENS, roof.get("offline_s")
        bound = "" if roof_s is None else \
            f"{tokens / roof_s:.0f} | {tokens / ours['offline_tokens_per_s'] / roof_s:.2f}"
        print(f"| {name} | offline {OFFLINE_TOKENS}/{OFFLINE_TOKENS}, {report['offline_requests']} requests "
              f"(output tok/s; roofline: prefills at the GEMM rate + decode steps at theirs) | "
              f"{ours['offline_tokens_per_s']:.0f} | | {bound or ' |'} | |")
        if "offline_plans" in ours:
            host_ms = 1e3 * sum(ours["offline_host_s"].values()) / max(ours["offline_plans"], 1)
            print(f"| {name} | offline split (s): {ours['offline_prompt_plans']} plans with prompt tokens / "
                  f"{ours['offline_plans'] - ours['offline_prompt_plans']} decode-only plans "
                  f"({ours['offline_decode_rows_mean']:.0f} rows on average); host ms a plan | "
                  f"{ours['offline_prompt_plans_s']:.2f} / {ours['offline_decode_plans_s']:.2f}; {host_ms:.2f} "
                  f"| | | | |")
        print(f"| {name} | peak device memory (GB): weights {roof['weights_GB']:.2f}, KV cache "
              f"{ours['kv_cache_bytes'] / 1e9:.2f} | {ours['peak_device_bytes'] / 1e9:.2f} | | | | |")


def row(name: str, metric: str, ours_s: float, hf_s: float | None, roof_s: float, per: int | None = None) -> None:
    """Milliseconds, or with `per` the rate per / seconds (tokens/s); the ratios are the same
    either way: ours against the roofline, HF against ours."""
    show = (lambda s: f"{1e3 * s:.2f}") if per is None else (lambda s: f"{per / s:.0f}")
    hf_shown, hf_ratio = ("", "") if hf_s is None else (show(hf_s), f"{hf_s / ours_s:.2f}")
    print(f"| {name} | {metric} | {show(ours_s)} | {hf_shown} | {show(roof_s)} | {ours_s / roof_s:.2f} | {hf_ratio} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=lambda s: s.split(","), default=list(SHAPES))
    p.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--ttft-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 8192])
    p.add_argument("--offline-requests", type=int, default=1024,
                   help="requests of the offline run (vLLM's throughput benchmark sends 1000)")
    p.add_argument("--max-num-seqs", type=int, default=512,
                   help="the engine's running requests at most (8192 batched tokens a step)")
    p.add_argument("--gpu-memory-fraction", type=float, default=GPU_MEMORY_FRACTION,
                   help="of the free GPU memory after the weights, for the KV cache (the engine's default: 0.85)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--no-decode-ahead", dest="decode_ahead", action="store_const", const=False, default=None,
                   help="engine.decode_ahead off (on by default: plan step n+1 while step n runs)")
    p.add_argument("--off", default="", help="A/B runs: GPU fast paths to switch off, e.g. flash,skinny_gemm "
                                             "(SHARDLINE_GPU_OFF)")
    p.add_argument("--out", default="bench/results/llm.json")
    args = p.parse_args()
    if args.off:
        os.environ["SHARDLINE_GPU_OFF"] = args.off   # read when the kernels module loads
    report = run(args)
    report["gpu_off"] = args.off
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print_table(report)


if __name__ == "__main__":
    main()
