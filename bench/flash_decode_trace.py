"""Where one flash_decode launch's time goes, block by block: flash_decode.cu built with
FLASH_DECODE_TRACE, whose blocks record clock64 at their phases and globaltimer at their start
and end, swapped into CudaOps for one decode batch of a shape's heads (--shape, Llama-3-8B's by default).

Run:  python -m bench.flash_decode_trace --cases 1x512,16x512,64x512 --after-gemm
      python -m bench.flash_decode_trace --shape smollm2-135m --config '{"decode_split_target": 0.25}'

Phases (thread 0 of each block with a tile): the tile lookup (the launch is told one query a
sequence, so flash_one_query_tile, not flash_find_tile's scan), the range and
first cache rows up to the dependent-launch wait, the wait, the key loop (Q's loads, every tile,
the last copies), the merge of the block's key warps, and the split merge (where the launch
splits keys: the last split's block merges them all). Alone, the batch's attention is one eager
launch after a warm-up; with --after-gemm it follows a QKV-sized skinny GEMM in one CUDA graph
with dependent launches, as in a decode step, so the wait shows how long blocks sat resident
before the GEMM ended. Prints a JSON line a case and mode: the launch's span and its blocks'
starts and ends (globaltimer, us from the first start), and each phase's median, 90th percentile
and maximum over the blocks with a tile (us at the SM's clock rate).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_times import BLOCK  # noqa: E402
from shapes import SHAPES  # noqa: E402
from tp_decode import captured_graph  # noqa: E402

SLOTS = 12   # FLASH_TRACE_SLOTS in flash_decode_loads.cu
PHASES = ("tile lookup", "range and first loads", "wait", "key loop", "key-warp merge", "split merge")
MAX_BLOCKS = 1 << 16


def parse_cases(text: str) -> list[tuple[int, int]]:
    """"1x512,64x2048" -> [(1, 512), (64, 2048)]: (sequences, keys a sequence)."""
    cases = []
    for value in text.split(","):
        try:
            seqs, keys = (int(part) for part in value.split("x"))
        except ValueError:
            raise ValueError(f"--cases: BATCHxKEYS, comma separated; got {value!r}") from None
        if seqs < 1 or keys < 1 or keys % BLOCK:
            raise ValueError(f"--cases: sizes must be positive and keys a multiple of {BLOCK}; got {value!r}")
        cases.append((seqs, keys))
    return cases


def summarize(records: np.ndarray, clock_hz: float) -> dict:
    """The trace of one launch (a row of SLOTS uint64 a block, zero for blocks that never ran)
    as times: how many blocks of each kind ran, the span, when the blocks with a tile started
    and ended, and each phase's median / 90th percentile / maximum over them."""
    ran = records[records[:, 8] > 0]
    if not len(ran):
        raise ValueError("flash_decode_trace: no block recorded its start")
    first = int(ran[:, 8].min())
    kinds = {name: int((ran[:, 10] == code).sum()) for code, name in enumerate(("past the last tile", "tile",
                                                                                "split without keys"))}
    tiles = ran[ran[:, 10] == 1]
    out = {"blocks": kinds, "sms": int(len(np.unique(ran[:, 11]))),
           "span_us": round((int(ran[:, 9].max()) - first) / 1e3, 3)}
    if len(tiles):
        starts, ends = (tiles[:, 8].astype(np.int64) - first) / 1e3, (tiles[:, 9].astype(np.int64) - first) / 1e3
        out["tile_starts_us"] = [round(float(np.median(starts)), 3), round(float(starts.max()), 3)]
        out["tile_ends_us"] = [round(float(ends.min()), 3), round(float(np.median(ends)), 3),
                               round(float(ends.max()), 3)]
        phases = np.diff(tiles[:, :7].astype(np.int64), axis=1) / clock_hz * 1e6
        out["phases_us"] = {name: [round(float(np.median(p)), 3), round(float(np.percentile(p, 90)), 3),
                                   round(float(p.max()), 3)] for name, p in zip(PHASES, phases.T)}
    return out


def traced_kernel(template: str):
    """flash_decode_kernel<template> built with FLASH_DECODE_TRACE, and its trace as a
    [MAX_BLOCKS, SLOTS] device array."""
    import cupy
    from shardline.kernels import cuda_common
    source = cuda_common._module_source("flash_decode")
    options = ("-std=c++17", f"-DFLASH_DECODE_TRACE={MAX_BLOCKS}") + cuda_common._include_options()
    name = f"flash_decode_kernel<{template}>"
    module = cupy.RawModule(code=source, options=options, name_expressions=[name])
    function = module.get_function(name)
    trace = cupy.ndarray((MAX_BLOCKS, SLOTS), dtype=cupy.uint64, memptr=module.get_global("flash_decode_trace"))
    return function, trace


def trace_case(ops, heads: tuple[int, int, int], seqs: int, keys: int, after_gemm: bool, rng) -> dict:
    """One case's trace; heads: (query heads, KV heads, head size)."""
    import cupy
    from shardline.kernels.cuda_common import bf16_bits, flash_decode_smem_bytes, flash_decode_template

    num_heads, kv_heads, head_dim = heads

    def random(*shape):
        return bf16_bits(cupy.random.standard_normal(shape, dtype=cupy.float32) / 8)
    num_blocks = seqs * keys // BLOCK
    k, v = random(num_blocks, BLOCK, kv_heads, head_dim), random(num_blocks, BLOCK, kv_heads, head_dim)
    tables = cupy.asarray(rng.permutation(num_blocks).reshape(seqs, keys // BLOCK).astype(np.int32))
    seq_lens = cupy.full(seqs, keys, dtype=cupy.int32)
    query_start_loc = cupy.arange(seqs + 1, dtype=cupy.int32)
    q = random(seqs, num_heads, head_dim)
    tile = ops._decode_tile(q, seqs, kv_heads)
    if tile is None:
        raise RuntimeError(f"{seqs}x{keys}: flash_decode does not run this launch")
    template = flash_decode_template("__nv_bfloat16", head_dim, tile)
    function, trace = traced_kernel(template)
    function.max_dynamic_shared_size_bytes = flash_decode_smem_bytes(head_dim, tile)
    key, shipped = ("flash_decode_kernel", template), ops._functions[("flash_decode_kernel", template)]
    ops._functions[key] = function
    x, w = random(seqs, num_heads * head_dim), random((num_heads + 2 * kv_heads) * head_dim, num_heads * head_dim)

    def attend():
        if after_gemm:
            ops.linear(x, w)
        ops.paged_attention(q, k, v, tables, seq_lens, query_start_loc, head_dim ** -0.5, one_query_each=True)
    try:
        if after_gemm:   # one graph with dependent launches, as a decode step's (the warm-up times the GEMM's K split)
            def step():
                with ops.dependent_launches():
                    attend()
            with captured_graph(step) as (graph, stream):
                graph.launch(stream)
                stream.synchronize()
                trace.fill(0)
                graph.launch(stream)
                stream.synchronize()
        else:
            attend()
            cupy.cuda.Device().synchronize()
            trace.fill(0)
            attend()
            cupy.cuda.Device().synchronize()
        records = cupy.asnumpy(trace)
    finally:
        ops._functions[key] = shipped
    clock_hz = cupy.cuda.Device().attributes["ClockRate"] * 1e3
    return {"case": f"{seqs}x{keys}", "mode": "after a GEMM" if after_gemm else "alone",
            "tile": "x".join(map(str, tile)), **summarize(records, clock_hz)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="1x512,16x512,64x512")
    p.add_argument("--after-gemm", action="store_true", help="also in a graph after a QKV-sized skinny GEMM")
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES), help="whose heads")
    p.add_argument("--config", default="{}", help="JSON of CudaOps attributes to set (e.g. decode_split_target)")
    p.add_argument("--out", default="bench/results/flash_decode_trace.json")
    args = p.parse_args()
    from shardline.kernels.cuda_ops import CudaOps
    ops, rng, rows = CudaOps(), np.random.default_rng(0), []
    for name, value in json.loads(args.config).items():
        setattr(ops, name, value)
    hf = SHAPES[args.shape]
    heads = (hf["num_attention_heads"], hf["num_key_value_heads"],
             hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])
    for seqs, keys in parse_cases(args.cases):
        for after_gemm in (False, True) if args.after_gemm else (False,):
            rows.append({"shape": args.shape, **trace_case(ops, heads, seqs, keys, after_gemm, rng)})
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
