"""Flash attention time against its tile sizes, one GPU: how the keys-per-tile and pipeline
depth constants of kernels/flash_decode.cu (decode steps) and kernels/flash_attention.cu
(prefill) were chosen.

Run:  python -m bench.flash_tile_sweep --decode 16x3x8,16x3x4 --prefill 64x2 --out bench/results/flash_tiles.json

Each value is keys per tile, optionally x tiles in flight (BK and STAGES; 2 when left out),
and for decode optionally x warps a block (KW; 4 when left out). For each it compiles a copy
of the kernels with those constants and times CudaOps.paged_attention (Llama-3-8B heads: 32
query, 8 KV, head_dim 128, fp16, blocks of 16): decode batches 1-256 at 512 keys (and 256 at
192), with the split target of 1-8 blocks an SM, replayed from a CUDA graph (no host launch
cost in the figure), and prefills of 2048 / 8192 tokens and 16 x 128 (CUDA events around
eager calls). Decode rows named "flash_attention KW=4" are the prefill kernel's decode
shape, which flash_decode.cu replaced, timed the same way.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tp_decode import gpu_seconds, graph_seconds  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
DECODE_BATCHES = (1, 16, 32, 48, 64, 96, 128, 192, 256)


def ops_with_tiles(decode: tuple[int, int, int], prefill: tuple[int, int]):
    """CudaOps whose flash_decode kernel uses the `decode` (keys per tile, stages, warps) and whose
    flash_attention kernel's prefill shape uses `prefill` (a patched copy of the sources)."""
    import shardline.kernels.cuda_attention as attention
    import shardline.kernels.cuda_common as common
    from shardline.kernels.cuda_ops import CudaOps
    source_dir = Path(common.__file__).resolve().parent
    folder = Path(tempfile.mkdtemp())
    for f in source_dir.glob("*.cu"):
        shutil.copy(f, folder / f.name)
    text = (folder / "flash_attention.cu").read_text()
    for constant, value in (("BK", prefill[0]), ("STAGES", prefill[1])):
        text, count = re.subn(rf"constexpr int {constant} = KW == 1 \? \d+ :",
                              f"constexpr int {constant} = KW == 1 ? {value} :", text)
        assert count == 1, f"flash_attention.cu no longer has the {constant} line this sweep patches"
    (folder / "flash_attention.cu").write_text(text)
    shipped = common.flash_smem_bytes

    def smem(head_dim: int, key_warps: int) -> int:
        if key_warps != 1:
            return shipped(head_dim, key_warps)
        keys, stages = prefill
        return key_warps * stages * 2 * keys * (head_dim + 8) * 2
    common._KERNEL_DIR, common.flash_smem_bytes, attention.flash_smem_bytes = folder, smem, smem
    shipped_prefill = common.flash_prefill_smem_bytes

    def prefill_smem(head_dim: int) -> int:   # flash_prefill_kernel with the same patched tile
        return shipped_prefill(head_dim, *prefill)
    common.flash_prefill_smem_bytes = attention.flash_prefill_smem_bytes = prefill_smem
    common._KERNELS["flash_decode"] = {"flash_decode_kernel": tuple(
        common.flash_decode_template(t, d, decode) for t in ("__half", "__nv_bfloat16")
        for d in common._FLASH_HEAD_DIMS)}
    ops = CudaOps(0)
    ops.decode_tiles = ((decode, float("inf")),)
    return ops


def cache(rng, seqs: int, tokens: int, contiguous: bool):
    import cupy
    num_blocks = seqs * tokens // BLOCK
    k, v = (cupy.asarray(rng.standard_normal((num_blocks, BLOCK, KV_HEADS, HEAD_DIM), dtype=np.float32))
            .astype(cupy.float16) for _ in range(2))
    order = np.arange(num_blocks) if contiguous else rng.permutation(num_blocks)
    return k, v, cupy.asarray(order.reshape(seqs, tokens // BLOCK).astype(np.int32)), \
        cupy.full(seqs, tokens, dtype=cupy.int32)


def sweep(ops, rng, decode: tuple[int, int, int], prefill: tuple[int, int], old_decode: bool) -> list[dict]:
    import cupy
    rows = []
    kernels = [("flash_decode", decode)] + ([("flash_attention KW=4", (16, 2, 4))] if old_decode else [])
    for batch, keys in [(b, 512) for b in DECODE_BATCHES] + [(256, 192)]:
        k, v, tables, seq_lens = cache(rng, batch, keys, contiguous=False)
        q = cupy.asarray(rng.standard_normal((batch, HEADS, HEAD_DIM), dtype=np.float32)).astype(cupy.float16)
        qsl = cupy.arange(batch + 1, dtype=cupy.int32)
        for kernel, tile in kernels:
            ops.use_flash_decode = kernel == "flash_decode"
            for target in (1, 2, 4, 8):   # blocks an SM the key splits aim at
                ops.decode_split_target, sms = target, ops._multiprocessors
                ops._multiprocessors = sms * target // 2 if kernel != "flash_decode" else sms   # (KW=4: 2 an SM)
                s = graph_seconds(lambda: ops.paged_attention(q, k, v, tables, seq_lens, qsl, 0.088))
                ops._multiprocessors = sms
                rows.append({"kernel": kernel, "decode_bk": tile[0], "decode_stages": tile[1],
                             "decode_warps": tile[2], "batch": batch, "keys": keys,
                             "split_target": target, "us": s * 1e6, "GBps": 2 * k.nbytes / s / 1e9})
                print(json.dumps(rows[-1]), flush=True)
    ops.use_flash_decode = True
    for seqs, tokens in ((1, 2048), (1, 8192), (16, 128)):
        k, v, tables, seq_lens = cache(rng, seqs, tokens, contiguous=True)
        q = cupy.asarray(rng.standard_normal((seqs * tokens, HEADS, HEAD_DIM), dtype=np.float32)).astype(cupy.float16)
        qsl = cupy.arange(seqs + 1, dtype=cupy.int32) * tokens
        s = gpu_seconds(lambda: ops.paged_attention(q, k, v, tables, seq_lens, qsl, 0.088), reps=10)
        flops = seqs * 4 * HEAD_DIM * HEADS * tokens * (tokens + 1) / 2
        rows.append({"prefill_bk": prefill[0], "prefill_stages": prefill[1], "seqs": seqs, "tokens": tokens,
                     "us": s * 1e6, "TFLOPs": flops / s / 1e12})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _shapes(text: str, defaults: tuple[int, ...]) -> list[tuple[int, ...]]:
    """"16x4,32" -> [(16, 4), (32, 2)] with defaults (2,): keys per tile, then what `defaults`
    fill where left out (stages; for decode, warps)."""
    shapes = []
    for value in text.split(","):
        given = [int(part) for part in value.split("x")]
        shapes.append(tuple(given + list(defaults[len(given) - 1:])))
    return shapes


def suggest_tiles(rows: list[dict], multiprocessors: int) -> str:
    """The SHARDLINE_FLASH_DECODE_TILES value these timings suggest: each batch (at 512 keys)
    gets its fastest tile, bounds halfway (in blocks an SM) between batches whose fastest differ."""
    best: dict[int, tuple] = {}
    for r in rows:
        if r.get("kernel") == "flash_decode" and r["keys"] == 512 and r["us"] < best.get(r["batch"], (0, 1e30))[1]:
            best[r["batch"]] = ("x".join(str(r[f"decode_{k}"]) for k in ("bk", "stages", "warps")), r["us"])
    batches = sorted(best)
    bounds = [f"{best[a][0]}<{(a + b) / 2 * KV_HEADS / multiprocessors:.2f}"
              for a, b in zip(batches, batches[1:]) if best[a][0] != best[b][0]]
    return ",".join(bounds + [best[batches[-1]][0]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decode", default="16x3x8,16x3x4,16x2x4,16x3x2",
                   help="keys per tile [x stages [x warps]] of flash_decode.cu to try")
    p.add_argument("--prefill", default="64x2", help="keys per tile [x stages] of the prefill shape to try")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    decode, prefill = _shapes(args.decode, (2, 4)), _shapes(args.prefill, (2,))
    if any(tile[0] not in (16, 32) for tile in decode):   # flash_decode.cu looks a tile's rows up a lane a key
        p.error(f"--decode: keys per tile must be 16 or 32, got {args.decode}")
    rows = []
    for i in range(max(len(decode), len(prefill))):   # pairs, the shorter list repeating its last value
        pair = decode[min(i, len(decode) - 1)], prefill[min(i, len(prefill) - 1)]
        ops = ops_with_tiles(*pair)
        rows += sweep(ops, rng, *pair, old_decode=i == 0)
    suggested = suggest_tiles(rows, ops._multiprocessors)
    print(f"suggested: SHARDLINE_FLASH_DECODE_TILES={suggested}")
    rows.append({"suggested_decode_tiles": suggested})
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
