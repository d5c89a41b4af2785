"""Load benchmark of a shardline cluster, and what the coordinator adds.

    python -m bench.serve_load --requests 500 --concurrency 32

Starts a local cluster (default: two replicas of the embedded SmolLM2 model
on the NumPy backend) with `shardline serve`, then runs, in this order:

1. probe: `--probe-requests` requests one at a time, alternating between the
   coordinator's `Shardline.Generate` and a worker's `Worker.Generate`: TTFT
   and end-to-end latency with no queueing. The difference of the medians is
   the coordinator's added latency (tokenizing, routing, one more hop).
2. coordinator: N requests at concurrency C through the coordinator, with
   text prompts as users send them.
3. direct: a mix of the same shape (same prompt word counts and max_tokens,
   fresh words so the prefix cache cannot help) at the same concurrency,
   sent straight to the engine groups' Worker services round-robin, prompts
   tokenized by the bench beforehand. The baseline, measured in the same run.

Every request is greedy with `ignore_eos`, so its output length is its
max_tokens. The client API does not expose worker addresses, so the bench
runs the coordinator through `LocalServer` with its own entry
(`python -m bench.serve_load _serve -c FILE --ready-file PATH`): the same
`start_cluster` as `shardline serve`, in its own process as in production,
which also writes the registry's group -> address map next to the ready
file. Against a running cluster (--url), pass --worker-address; without
any, the direct phases are skipped.

Writes JSON to bench/results/ and prints a markdown table. It is a client of
the cluster: it loads only the tokenizer, never a model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc

from shardline.client.client import AsyncShardlineClient, ShardlineError
from shardline.client.local_server import LocalServer, ServerStartError
from shardline.proto import shardline_pb2, worker_pb2, worker_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "cluster_configs" / "local-2-replicas.yaml"
RESULTS_DIR = REPO / "bench" / "results"
PROMPT_WORDS = (16, 64, 256, 512)          # about one token per word
PROMPT_WEIGHTS = (0.4, 0.3, 0.2, 0.1)
MAX_TOKENS = (4, 8, 16)
PROBE_WORDS, PROBE_MAX_TOKENS = 64, 8
WORDS = ("the time people way year work world life day hand part child eye place week case point company "
         "number group problem fact water story river mountain city house light music garden window market "
         "morning evening winter summer paper letter table road bridge island forest animal engine signal "
         "question answer reason history science nature power energy system field value model cloud stone").split()


@dataclass(frozen=True)
class RequestSpec:
    prompt: str
    max_tokens: int
    token_ids: tuple[int, ...] = ()     # the prompt tokenized by the bench (direct phases only)


@dataclass(frozen=True)
class Sample:
    ttft_s: float | None     # until the first message carrying tokens
    e2e_s: float
    prompt_tokens: int
    output_tokens: int
    error: str = ""


def make_mix(num_requests: int, seed: int, tag: str) -> list[RequestSpec]:
    """Unique prompts (a numbered, tagged first line) of mixed lengths. The
    lengths and max_tokens depend on `seed` only, the words also on `tag`:
    mixes with one seed have the same shape and share no prefix."""
    shape, words = random.Random(seed), random.Random(f"{seed}-{tag}")
    specs = []
    for i in range(num_requests):
        num_words, max_tokens = shape.choices(PROMPT_WORDS, PROMPT_WEIGHTS)[0], shape.choice(MAX_TOKENS)
        body = " ".join(words.choice(WORDS) for _ in range(num_words))
        specs.append(RequestSpec(f"{tag} request {i}: {body}", max_tokens))
    return specs


def probe_mix(num_requests: int, seed: int, tag: str) -> list[RequestSpec]:
    rng = random.Random(f"{seed}-probe-{tag}")
    return [RequestSpec(f"{tag} probe {i}: " + " ".join(rng.choice(WORDS) for _ in range(PROBE_WORDS)),
                        PROBE_MAX_TOKENS) for i in range(num_requests)]


async def via_coordinator(client: AsyncShardlineClient, spec: RequestSpec) -> Sample:
    start, ttft_s, num_tokens, prompt_tokens = time.perf_counter(), None, 0, 0
    try:
        async with client.generate(spec.prompt, max_tokens=spec.max_tokens, temperature=0.0,
                                   ignore_eos=True) as stream:
            async for chunk in stream:
                if chunk.token_ids and ttft_s is None:
                    ttft_s = time.perf_counter() - start
                num_tokens += len(chunk.token_ids)
                prompt_tokens = chunk.usage.prompt_tokens if chunk.usage else prompt_tokens
    except ShardlineError as err:
        return Sample(None, time.perf_counter() - start, 0, num_tokens, f"{err.code}: {err.message}")
    return Sample(ttft_s, time.perf_counter() - start, prompt_tokens, num_tokens)


async def direct(stub: worker_pb2_grpc.WorkerStub, spec: RequestSpec) -> Sample:
    request = worker_pb2.WorkerGenerateRequest(
        request_id=f"bench-{uuid.uuid4().hex}", prompt_token_ids=spec.token_ids,
        sampling=shardline_pb2.SamplingOptions(max_tokens=spec.max_tokens, temperature=0.0, ignore_eos=True))
    start, ttft_s, num_tokens, prompt_tokens = time.perf_counter(), None, 0, 0
    try:
        async for response in stub.Generate(request):
            if response.error:
                return Sample(None, time.perf_counter() - start, 0, num_tokens, response.error)
            if response.token_ids and ttft_s is None:
                ttft_s = time.perf_counter() - start
            num_tokens += len(response.token_ids)
            prompt_tokens = response.num_prompt_tokens or prompt_tokens
    except grpc.RpcError as err:
        return Sample(None, time.perf_counter() - start, 0, num_tokens, f"{err.code().name}: {err.details()}")
    return Sample(ttft_s, time.perf_counter() - start, prompt_tokens, num_tokens)


async def run_phase(send, specs: list[RequestSpec], concurrency: int) -> tuple[list[Sample], float]:
    """`send(index, spec)` for every spec, `concurrency` at a time."""
    pending = iter(enumerate(specs))
    samples: list[Sample | None] = [None] * len(specs)
    done, report_every = [0], max(len(specs) // 10, 1)

    async def lane() -> None:
        for index, spec in pending:     # one shared iterator: each spec is sent once
            samples[index] = await send(index, spec)
            done[0] += 1
            if done[0] % report_every == 0 and len(specs) >= 20:
                print(f"serve_load:   {done[0]}/{len(specs)} done", file=sys.stderr, flush=True)

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return samples, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(samples: list[Sample], wall_s: float, concurrency: int) -> dict:
    ok = [s for s in samples if not s.error]
    ttft_ms = [s.ttft_s * 1e3 for s in ok if s.ttft_s is not None]
    e2e_ms = [s.e2e_s * 1e3 for s in ok]
    num_output_tokens = sum(s.output_tokens for s in ok)
    return {
        "concurrency": concurrency, "requests": len(samples), "errors": len(samples) - len(ok),
        "first_error": next((s.error for s in samples if s.error), ""), "wall_s": round(wall_s, 3),
        "requests_per_s": len(ok) / wall_s, "output_tokens": num_output_tokens,
        "output_tokens_per_s": num_output_tokens / wall_s,
        "mean_prompt_tokens": sum(s.prompt_tokens for s in ok) / max(len(ok), 1),
        "ttft_ms": {"p50": percentile(ttft_ms, 0.5), "p99": percentile(ttft_ms, 0.99)},
        "e2e_ms": {"p50": percentile(e2e_ms, 0.5), "p99": percentile(e2e_ms, 0.99)},
    }


def load_tokenizer(config_path: Path):
    from shardline.coordinator.cluster_config import load_cluster_config
    from shardline.models.default_model import default_model_path
    from shardline.worker.tokenizer import Tokenizer
    model = load_cluster_config(config_path).model
    path = default_model_path() if model == "default" else Path(model)
    return Tokenizer.from_folder(path) if path.is_dir() else Tokenizer.from_gguf(path)


def tokenized(specs: list[RequestSpec], tokenizer) -> list[RequestSpec]:
    # encode() as the coordinator does for a plain (non-chat) prompt; the
    # mean prompt tokens of both phases in the results show they agree.
    return [RequestSpec(s.prompt, s.max_tokens, tuple(tokenizer.encode(s.prompt))) for s in specs]


async def probe(client: AsyncShardlineClient, stubs: list, args) -> dict:
    """One request at a time, alternating coordinator and direct."""
    via = probe_mix(args.probe_requests, args.seed, "coordinator")
    straight = tokenized(probe_mix(args.probe_requests, args.seed, "direct"), args.tokenizer)
    coordinator_samples, direct_samples = [], []
    for index, (a, b) in enumerate(zip(via, straight)):
        coordinator_samples.append(await via_coordinator(client, a))
        direct_samples.append(await direct(stubs[index % len(stubs)], b))
    return {"probe_coordinator": summarize(coordinator_samples, sum(s.e2e_s for s in coordinator_samples), 1),
            "probe_direct": summarize(direct_samples, sum(s.e2e_s for s in direct_samples), 1)}


async def warm_up(client: AsyncShardlineClient, stubs: list, args) -> None:
    specs = tokenized(make_mix(args.warmup, args.seed, "warmup"), args.tokenizer)
    await run_phase(lambda i, spec: via_coordinator(client, spec), specs, args.concurrency)
    if stubs:
        await run_phase(lambda i, spec: direct(stubs[i % len(stubs)], spec), specs, args.concurrency)


async def measure(address: str, workers: dict[str, str], args) -> dict:
    channels = [grpc.aio.insecure_channel(a) for a in workers.values()]
    stubs = [worker_pb2_grpc.WorkerStub(c) for c in channels]
    result: dict = {}
    try:
        async with AsyncShardlineClient(address, token=args.token) as client:
            await client.wait_ready(timeout_s=60.0)
            await warm_up(client, stubs, args)
            if stubs:
                result.update(await probe(client, stubs, args))
            print(f"serve_load: {args.requests} requests at concurrency {args.concurrency} via the coordinator",
                  file=sys.stderr, flush=True)
            specs = make_mix(args.requests, args.seed, "coordinator")
            samples, wall_s = await run_phase(lambda i, spec: via_coordinator(client, spec), specs,
                                              args.concurrency)
            result["coordinator"] = summarize(samples, wall_s, args.concurrency)
            stats = await client.stats()
            result["routed_per_group"] = {g.name: g.requests_routed for g in stats.groups}
            if stubs:
                print("serve_load: the same mix straight to the workers", file=sys.stderr, flush=True)
                specs = tokenized(make_mix(args.requests, args.seed, "direct"), args.tokenizer)
                samples, wall_s = await run_phase(lambda i, spec: direct(stubs[i % len(stubs)], spec), specs,
                                                  args.concurrency)
                result["direct"] = summarize(samples, wall_s, args.concurrency)
    finally:
        for channel in channels:
            await channel.close()
    return result


def added_latency_ms(result: dict) -> dict:
    """Coordinator minus direct, p50s, unloaded (probe) and at full load."""
    added = {}
    for label, (via, straight) in {"unloaded": ("probe_coordinator", "probe_direct"),
                                   "loaded": ("coordinator", "direct")}.items():
        if via in result and straight in result:
            added[label] = {f"{metric}_p50": _diff(result[via][metric]["p50"], result[straight][metric]["p50"])
                            for metric in ("ttft_ms", "e2e_ms")}
    return added


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


PHASES = (("probe via coordinator", "probe_coordinator"), ("probe direct to a worker", "probe_direct"),
          ("via coordinator", "coordinator"), ("direct to workers", "direct"))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown(result: dict) -> str:
    lines = ["| phase | concurrency | requests | errors | req/s | output tok/s | prompt tok (mean) "
             "| TTFT p50 ms | TTFT p99 ms | e2e p50 ms | e2e p99 ms |", "|" + "---|" * 11]
    for label, key in PHASES:
        if key not in result:
            continue
        r = result[key]
        lines.append(f"| {label} | {r['concurrency']} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.2f} "
                     f"| {r['output_tokens_per_s']:.1f} | {r['mean_prompt_tokens']:.0f} | {_ms(r['ttft_ms']['p50'])} "
                     f"| {_ms(r['ttft_ms']['p99'])} | {_ms(r['e2e_ms']['p50'])} | {_ms(r['e2e_ms']['p99'])} |")
    for label, added in result.get("coordinator_added_latency_ms", {}).items():
        lines.append(f"\ncoordinator added latency ({label}): TTFT p50 {_ms(added['ttft_ms_p50'])} ms, "
                     f"e2e p50 {_ms(added['e2e_ms_p50'])} ms")
    if "routed_per_group" in result:
        lines.append(f"\nrequests routed per group (whole run): {result['routed_per_group']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG, help="cluster config to start (with --url: the cluster's config, for its tokenizer)")
    p.add_argument("--backend", default="numpy", help="engine backend override; 'config' keeps the config's")
    p.add_argument("--url", help="bench a running cluster at HOST:PORT instead of starting one")
    p.add_argument("--worker-address", action="append", default=[], metavar="HOST:PORT",
                   help="a Worker service for the direct phases (repeatable; default: from the cluster's log)")
    p.add_argument("--token", default=os.environ.get("SHARDLINE_TOKEN"))
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--probe-requests", type=int, default=32)
    p.add_argument("--warmup", type=int, default=16, help="requests sent (each way) before measuring")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout-s", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: bench/results/serve_load-<time>.json)")
    return p.parse_args(argv)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except OSError:
        return ""


def run_against(address: str, workers: dict[str, str], args) -> dict:
    if not workers:
        print("serve_load: no worker addresses; the direct phases are skipped", file=sys.stderr)
    result = {"benchmark": "serve_load", "config": str(args.config), "backend": args.backend,
              "url": args.url or "", "workers": workers, "git_commit": _git_commit(),
              "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "args": {k: str(v) for k, v in vars(args).items() if k != "tokenizer"}}
    result.update(asyncio.run(measure(address, workers, args)))
    result["coordinator_added_latency_ms"] = added_latency_ms(result)
    return result


SERVE_CHILD = "_serve"


def _child_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}


def _workers_file(ready_file: Path) -> Path:
    return ready_file.with_name(ready_file.name + ".workers.json")


def serve_child(argv: list[str]) -> int:
    """`shardline serve`, plus the registry's worker addresses written to
    READY.workers.json before READY itself."""
    p = argparse.ArgumentParser(prog=f"python -m bench.serve_load {SERVE_CHILD}")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--ready-file", required=True, type=Path)
    args = p.parse_args(argv)
    from shardline.coordinator.cluster_config import ClusterConfigError, load_cluster_config
    try:
        config = load_cluster_config(args.config)
    except ClusterConfigError as err:
        print(f"serve_load: error: {err}", file=sys.stderr)
        return 2
    return asyncio.run(_serve_cluster(config, args.config, args.ready_file))


async def _serve_cluster(config, config_path: str, ready_file: Path) -> int:
    from shardline.coordinator.server import start_cluster
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    cluster = await start_cluster(config, config_path)
    try:
        workers = {g.name: g.address for g in cluster.registry.groups()}
        _workers_file(ready_file).write_text(json.dumps(workers))
        partial = ready_file.with_name(ready_file.name + ".partial")
        partial.write_text(cluster.address + "\n")
        partial.replace(ready_file)
        await stop.wait()
    finally:
        await cluster.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [SERVE_CHILD]:
        return serve_child(argv[1:])
    args = parse_args(argv)
    explicit = {f"worker{i}": a for i, a in enumerate(args.worker_address)}
    try:
        args.tokenizer = load_tokenizer(args.config)
        if args.url:
            result = run_against(args.url, explicit, args)
        else:
            overrides = {} if args.backend == "config" else {"engine": {"backend": args.backend}}
            print(f"serve_load: starting a cluster from {args.config} ...", file=sys.stderr)
            with LocalServer(args.config, overrides=overrides, startup_timeout_s=args.startup_timeout_s,
                             command=[sys.executable, "-m", "bench.serve_load", SERVE_CHILD],
                             env=_child_env()) as server:
                workers = explicit or json.loads(_workers_file(server.ready_file).read_text())
                print(f"serve_load: coordinator {server.address}, workers {workers}", file=sys.stderr)
                result = run_against(server.address, workers, args)
    except (ServerStartError, ShardlineError, ValueError, OSError) as err:
        print(f"serve_load: error: {err}", file=sys.stderr)
        return 1
    out = args.out or RESULTS_DIR / f"serve_load-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
