"""Prefill -> decode KV hand-off between two GPUs over NCCL, and what it does to TTFT.

Run on two GPUs:  mpiexec -n 2 python -m mpi4py bench/kv_transfer.py --out bench/results/kv_transfer.json

Rank 0 (GPU 0) is the prefill engine, rank 1 (GPU 1) the decode engine; both
hold a Llama-3-8B-shaped random model (bf16, RandomCheckpoint: no files) in
an LLMEngine with a paged KV cache. Measured in one run:

- the link: NCCL send/recv of 1 GiB, one way (the peak), and of exactly the
  KV bytes of a --transfer-tokens prompt (the plain baseline);
- the KV transfer of that prompt the way a hand-off moves it: the prompt
  prefilled on rank 0, then per chunk of --chunk tokens every layer's K and V
  rows gathered from the paged cache into one buffer (one kernel), sent, and
  scattered into the blocks rank 1 reserved (LLMEngine.reserve_remote_kv),
  timed on rank 1 from the start signal to the last block written;
- the served transport's data path (worker/kv_link.py): the prompt's K and V
  read from rank 0's paged cache for all layers at once (ModelRunner.read_kv,
  left on the GPU), sent k then v over an NcclLink (the two-rank pair
  communicator the coordinator brokers between groups), received into fresh
  buffers and committed into rank 1's reservation (LLMEngine.commit_remote_kv);
- TTFT for each --prompts length: mixed (rank 1 prefills and samples the
  first token itself) against disaggregated (rank 0 prefills in chunks and
  sends each chunk's KV on a second stream while the next chunk computes;
  rank 1 commits the reservation with the first token rank 0 sampled).

Prints a markdown table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import LLAMA3_8B  # noqa: E402
from tables import print_markdown_table  # noqa: E402
from tp_decode import gpu_seconds  # noqa: E402  (the same timer)

GIB = 1 << 30


def build(rank: int, args):
    from shardline.kernels.backend import create_backend
    from shardline.models.config import parse_llama
    from shardline.models.llama import LlamaForCausalLM
    from shardline.models.random_checkpoint import RandomCheckpoint
    from shardline.models.weights import WeightReader
    from shardline.worker.engine import EngineConfig, LLMEngine
    from shardline.worker.offline import LocalModel

    backend = create_backend("cuda", "bfloat16", device_id=rank)
    hf = {**LLAMA3_8B, "num_hidden_layers": args.layers, "max_position_embeddings": 16384}
    model = LlamaForCausalLM(backend, parse_llama(hf), WeightReader(RandomCheckpoint(hf), backend, False))
    blocks = 2 * (-(-max(args.prompts + [args.transfer_tokens]) // 16) + 4)
    config = EngineConfig(backend="cuda", dtype="bfloat16", num_kv_blocks=blocks, max_num_batched_tokens=args.chunk,
                          max_num_seqs=4, enable_prefix_caching=False)
    return backend, LLMEngine(config, LocalModel(model, None))


def link_seconds(comm, rank: int, num_bytes: int) -> float:
    """One-way NCCL send of num_bytes, 0 -> 1 (both ranks time the same loop)."""
    import cupy
    buffer = cupy.zeros(num_bytes // 2, dtype=cupy.uint16)
    return gpu_seconds(lambda: comm.send(buffer, 1) if rank == 0 else comm.recv(buffer, 0), reps=5)


def chunks(num_tokens: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, num_tokens)) for start in range(0, num_tokens, size)]


def prefill_only(engine, request_id: str, prompt: list[int]) -> int:
    """Runs the prompt through rank 0's engine (kept alive: max_tokens 2); its first token."""
    from shardline.worker.sampling_params import SamplingParams
    engine.add_request(request_id, prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    while True:
        for out in engine.step():
            if out.new_token_ids:
                return out.new_token_ids[0]


def drop(engine, request_id: str) -> None:
    engine.abort(request_id)
    engine.step()


TTFT_MAX_TOKENS = 2   # what mixed_ttft's request asks for: a prompt fits max_model_len less these


def mixed_ttft(engine, prompt: list[int]) -> float:
    import cupy
    from shardline.worker.sampling_params import SamplingParams
    cupy.cuda.Device().synchronize()
    start = time.perf_counter()
    engine.add_request("mixed", prompt, SamplingParams(max_tokens=TTFT_MAX_TOKENS, temperature=0.0, ignore_eos=True))
    while not any(out.new_token_ids for out in engine.step()):
        pass
    ttft = time.perf_counter() - start
    drop(engine, "mixed")
    return ttft


def disaggregated(comm, mpi, rank: int, engine, prompt: list[int], chunk: int, overlap: bool) -> dict:
    """Rank 0 prefills (and with `overlap` sends each chunk as soon as it is computed); rank 1
    receives into its reservation and commits. Times on rank 1 from the common start."""
    import cupy
    from shardline.worker.sampling_params import SamplingParams
    ranges = chunks(len(prompt), chunk)
    mpi.Barrier()
    start = time.perf_counter()
    if rank == 0:
        send_stream, keep = cupy.cuda.Stream(non_blocking=True), []
        engine.add_request("p", prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        first, sent = None, 0
        while first is None:
            for out in engine.step():
                first = out.new_token_ids[0] if out.new_token_ids else first
            computed = len(prompt) if first is not None else engine.scheduler.get_request("p").num_computed_tokens
            while overlap and sent < len(ranges) and ranges[sent][1] <= computed:
                _send_chunk(comm, engine, "p", ranges[sent], send_stream, keep)
                sent += 1
        for piece in ranges[sent:]:
            _send_chunk(comm, engine, "p", piece, send_stream, keep)
        with send_stream:
            comm.send(cupy.asarray([first], dtype=cupy.int32), 1)
        send_stream.synchronize()
        drop(engine, "p")
        return {"prefill_s": time.perf_counter() - start}
    engine.reserve_remote_kv("d", prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    receive_chunks(comm, engine, "d", ranges)
    first = int(comm.recv(cupy.zeros(1, dtype=cupy.int32), 0).get()[0])
    engine.scheduler.commit_remote_kv("d", first)
    ttft = time.perf_counter() - start
    drop(engine, "d")
    return {"ttft_s": ttft}


def receive_chunks(comm, engine, request_id: str, ranges: list[tuple[int, int]]) -> None:
    """Every layer's K and V rows of each chunk in one message, scattered into the reservation."""
    import cupy
    ops, kv = engine.runner.backend.ops, engine.runner.kv
    caches = kv.k + kv.v
    # Slot indices go up before the first receive: an upload from pageable memory would wait for it.
    indices = [cupy.asarray(engine.handoff.slots(request_id, lo, hi)) for lo, hi in ranges]
    for (lo, hi), index in zip(ranges, indices):
        rows = comm.recv(cupy.empty((len(caches), hi - lo, *caches[0].shape[2:]), dtype=caches[0].dtype), 0)
        ops.scatter_cache_rows(caches, index, rows)


def _send_chunk(comm, engine, request_id: str, piece: tuple[int, int], stream, keep: list) -> None:
    """Gathers the chunk's rows of every layer on `stream` once the compute stream has written them."""
    import cupy
    ops, kv = engine.runner.backend.ops, engine.runner.kv
    index = cupy.asarray(engine.handoff.slots(request_id, *piece))   # on the compute stream
    keep.append(index)                 # alive until the send stream is done with it
    computed = cupy.cuda.Event()
    computed.record()
    with stream:
        stream.wait_event(computed)
        comm.send(ops.gather_cache_rows(kv.k + kv.v, index), 1)


def stage_handoff(mpi, rank: int, engine, request_id: str, prompt: list[int]) -> int | None:
    """Rank 0's cache holds the prompt (its first token returned), rank 1 reserved blocks
    for it; both GPUs idle and the ranks in step when this returns."""
    import cupy
    from shardline.worker.sampling_params import SamplingParams
    first = None
    if rank == 0:
        first = prefill_only(engine, request_id, prompt)
    else:
        engine.reserve_remote_kv(request_id, prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    cupy.cuda.Device().synchronize()
    mpi.Barrier()
    return first


def move_only(comm, mpi, rank: int, engine, prompt: list[int], chunk: int) -> float:
    """The hand-off's data path alone: rank 0's cache already holds the prompt."""
    import cupy
    ranges = chunks(len(prompt), chunk)
    stage_handoff(mpi, rank, engine, "m", prompt)
    start = time.perf_counter()
    if rank == 0:
        stream, keep = cupy.cuda.Stream(non_blocking=True), []
        for piece in ranges:
            _send_chunk(comm, engine, "m", piece, stream, keep)
        stream.synchronize()
    else:
        receive_chunks(comm, engine, "m", ranges)
        cupy.cuda.Device().synchronize()
    elapsed = time.perf_counter() - start
    drop(engine, "m")
    return elapsed


def served_link_only(link, mpi, rank: int, engine, prompt: list[int]) -> float:
    """What a served hand-off over an NCCL pair link moves, timed on rank 1 to the commit."""
    import cupy
    config = engine.local.model.config
    shape = (config.num_layers, len(prompt), config.num_kv_heads, config.head_dim)
    first = stage_handoff(mpi, rank, engine, "s", prompt)
    start = time.perf_counter()
    if rank == 0:
        k, v = engine.runner.read_kv(engine.handoff.slots("s", 0, len(prompt)), to_host=False)
        link.send([k, v], 60.0)
        mpi.send(first, dest=1)
    else:
        k, v = link.recv([shape, shape], np.dtype(engine.local.model.backend.storage_dtype), 60.0)
        engine.commit_remote_kv("s", 0, k, v, mpi.recv(source=0))
        cupy.cuda.Device().synchronize()
    elapsed = time.perf_counter() - start
    drop(engine, "s")
    return elapsed


def open_nccl_link(mpi, rank: int, backend):
    """The pair link of worker/kv_link.py, its unique id passed over MPI instead of the coordinator."""
    from shardline.worker.kv_link import NcclLink
    unique_id = mpi.bcast(NcclLink.make_unique_id() if rank == 1 else None, root=1)
    return NcclLink(backend, rank, unique_id, 60.0)


def run(args) -> None:
    import cupy
    from mpi4py import MPI
    from shardline.parallel.nccl_communicator import NCCLCommunicator
    mpi = MPI.COMM_WORLD
    rank = mpi.Get_rank()
    backend, engine = build(rank, args)
    comm = NCCLCommunicator(mpi)
    rng = np.random.default_rng(0)
    kv_bytes_per_token = 2 * args.layers * 8 * 128 * 2
    transfer_bytes = kv_bytes_per_token * args.transfer_tokens
    peak_s, plain_s = link_seconds(comm, rank, GIB), link_seconds(comm, rank, transfer_bytes)
    prompt = rng.integers(0, 128256, args.transfer_tokens).tolist()
    disaggregated(comm, mpi, rank, engine, prompt, args.chunk, overlap=True)   # warm-up
    move_only(comm, mpi, rank, engine, prompt, args.chunk)
    move_s = min(move_only(comm, mpi, rank, engine, prompt, args.chunk) for _ in range(3))
    link = open_nccl_link(mpi, rank, backend)
    served_s = min(served_link_only(link, mpi, rank, engine, prompt) for _ in range(4))
    rows = []
    for length in args.prompts:
        prompt = rng.integers(0, 128256, length).tolist()
        mixed = mixed_ttft(engine, prompt) if rank == 1 else 0.0
        mixed = mixed_ttft(engine, prompt) if rank == 1 else 0.0      # the second, warm
        disagg = disaggregated(comm, mpi, rank, engine, prompt, args.chunk, overlap=True)
        rows.append({"prompt_tokens": length, "mixed_ttft_s": mixed, **disagg})
    gathered = mpi.gather(rows, root=1)
    if rank != 1:
        return
    for row, prefill in zip(rows, gathered[0]):
        row["disagg_ttft_s"], row["prefill_s"] = row.pop("ttft_s"), prefill["prefill_s"]
    result = {"device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), "layers": args.layers,
              "chunk_tokens": args.chunk, "transfer_tokens": args.transfer_tokens, "kv_bytes": transfer_bytes,
              "link_peak_GBps": GIB / peak_s / 1e9, "plain_send_GBps": transfer_bytes / plain_s / 1e9,
              "plain_send_s": plain_s, "handoff_move_s": move_s, "handoff_move_GBps": transfer_bytes / move_s / 1e9,
              "served_link_s": served_s, "served_link_GBps": transfer_bytes / served_s / 1e9,
              "ttft": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print_table(result)


def print_table(r: dict) -> None:
    print(f"\nKV hand-off on {r['device']} x2, Llama-3-8B shape ({r['layers']} layers), bf16, "
          f"{r['transfer_tokens']}-token prompt = {r['kv_bytes'] / 2**20:.0f} MiB of KV\n")
    peak = r["link_peak_GBps"]
    paths = [("NCCL send 1 GiB (link peak)", GIB / peak / 1e9, peak),
             ("NCCL send of the KV bytes, one buffer", r["plain_send_s"], r["plain_send_GBps"]),
             (f"hand-off: gather from paged cache, send per {r['chunk_tokens']}-token chunk, scatter into "
              f"reserved blocks", r["handoff_move_s"], r["handoff_move_GBps"])]
    if "served_link_s" in r:
        paths.append(("served pair link: read all layers from the cache, NcclLink send k and v, commit into the "
                      "reservation", r["served_link_s"], r["served_link_GBps"]))
    print_markdown_table(["path", "time ms", "GB/s", "vs link peak"],
                         [[name, f"{1e3 * seconds:.2f}", f"{GBps:.1f}", f"{GBps / peak:.2f}"]
                          for name, seconds, GBps in paths])
    print()
    print_markdown_table(
        ["prompt tokens", "TTFT mixed ms", "TTFT disaggregated ms", "prefill on rank 0 ms", "disagg / mixed"],
        [[row["prompt_tokens"], f"{1e3 * row['mixed_ttft_s']:.1f}", f"{1e3 * row['disagg_ttft_s']:.1f}",
          f"{1e3 * row['prefill_s']:.1f}", f"{row['disagg_ttft_s'] / row['mixed_ttft_s']:.2f}"] for row in r["ttft"]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/kv_transfer.json")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk = transfer chunk, tokens")
    p.add_argument("--transfer-tokens", type=int, default=2048)
    p.add_argument("--prompts", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 8192])
    p.add_argument("--watchdog-s", type=float, default=400.0)
    args = p.parse_args()
    import faulthandler
    faulthandler.dump_traceback_later(args.watchdog_s, exit=True)
    run(args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
