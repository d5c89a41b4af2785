"""GPU time of CudaOps.paged_attention for a few decode and prefill cases, with the kernels
of the shardline on the path: for A/B runs of two builds in alternating processes
(e.g. PYTHONPATH=/tmp/site_a, then /tmp/site_b), which compile-time choices need.

Run:  python -m bench.attention_times --cases decode:64x512,decode:16x2048,prefill:2048 --label new
      python -m bench.attention_times --cases prefill:2048 --config 'r16={}' \
          --config 'r32={"prefill_rows_per_warp": 32}'

--config NAME=JSON sets CudaOps attributes as bench.decode_ab does (run-time choices A/B in one
process); the settings alternate within each case, --reps times.

Llama-3-8B heads (32 query, 8 KV, head_dim 128), blocks of 16 in a random order, bf16 or
fp16. Decode cases (BATCHxKEYS, one query a sequence) replay a CUDA graph of 20 calls, so the
host's launch cost stays out; prefill cases ([SEQSx]TOKENS: SEQS sequences, one by default, of
TOKENS prompt tokens each, causal) time eager calls by CUDA events. Prints a JSON line a case
(us, and GB/s of K/V read or TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_ab import Settings  # noqa: E402
from tp_decode import gpu_seconds, graph_seconds  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def parse_cases(text: str) -> list[tuple[str, int, int]]:
    """"decode:64x512,prefill:2048,prefill:64x128" -> [("decode", 64, 512), ("prefill", 1, 2048),
    ("prefill", 64, 128)]: (kind, sequences, keys a sequence)."""
    cases = []
    for value in text.split(","):
        kind, _, size = value.partition(":")
        try:
            if kind == "decode":
                batch, keys = (int(part) for part in size.split("x"))
                cases.append((kind, batch, keys))
            elif kind == "prefill":   # TOKENS or SEQSxTOKENS
                *seqs, tokens = (int(part) for part in size.split("x"))
                if len(seqs) > 1:
                    raise ValueError(size)
                cases.append((kind, seqs[0] if seqs else 1, tokens))
            else:
                raise ValueError(kind)
        except ValueError:
            raise ValueError(f"--cases: decode:BATCHxKEYS or prefill:[SEQSx]TOKENS, comma separated; "
                             f"got {value!r}") from None
        if min(cases[-1][1:]) < 1 or cases[-1][2] % BLOCK:
            raise ValueError(f"--cases: sizes must be positive and keys a multiple of {BLOCK}; got {value!r}")
    return cases


def time_case(ops, kind: str, seqs: int, keys: int, dtype: str, rng) -> dict:
    import cupy
    from shardline.kernels.cuda_common import bf16_bits

    def random(shape):
        x = cupy.random.standard_normal(shape, dtype=cupy.float32)
        return bf16_bits(x) if dtype == "bfloat16" else x.astype(cupy.float16)
    num_blocks = seqs * keys // BLOCK
    k, v = random((num_blocks, BLOCK, KV_HEADS, HEAD_DIM)), random((num_blocks, BLOCK, KV_HEADS, HEAD_DIM))
    tables = cupy.asarray(rng.permutation(num_blocks).reshape(seqs, keys // BLOCK).astype(np.int32))
    seq_lens = cupy.full(seqs, keys, dtype=cupy.int32)
    rows = seqs if kind == "decode" else seqs * keys
    q = random((rows, HEADS, HEAD_DIM))
    query_start_loc = cupy.asarray(np.linspace(0, rows, seqs + 1).astype(np.int32))
    scale = 1 / np.sqrt(HEAD_DIM)

    def run():
        return ops.paged_attention(q, k, v, tables, seq_lens, query_start_loc, scale)
    if kind == "decode":
        s = graph_seconds(run)
        return {"kind": kind, "batch": seqs, "keys": keys, "us": s * 1e6, "GBps": 2 * k.nbytes / s / 1e9}
    s = gpu_seconds(run, reps=10)
    flops = seqs * 4 * HEAD_DIM * HEADS * keys * (keys + 1) / 2
    return {"kind": kind, "seqs": seqs, "tokens": keys, "us": s * 1e6, "TFLOPs": flops / s / 1e12}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="decode:1x512,decode:16x512,decode:64x512,decode:256x512,prefill:2048,"
                                      "prefill:8192")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--label", default="", help="tags each JSON line (the build under test)")
    p.add_argument("--config", action="append", help="NAME=JSON of CudaOps attributes (default: one, as built)")
    p.add_argument("--reps", type=int, default=1)
    args = p.parse_args()
    try:
        cases = parse_cases(args.cases)
    except ValueError as err:
        p.error(str(err))
    from shardline.kernels.cuda_ops import CudaOps
    ops, rng = CudaOps(0), np.random.default_rng(0)
    settings = Settings(ops, args.config or ["default={}"])
    for kind, seqs, keys in cases:
        for _ in range(args.reps):
            for name in settings.configs:
                settings.apply(name)
                row = time_case(ops, kind, seqs, keys, args.dtype, rng)
                print(json.dumps({"label": args.label, "config": name, "dtype": args.dtype, **row}), flush=True)


if __name__ == "__main__":
    main()
