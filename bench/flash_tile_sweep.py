"""Flash attention time against its tile sizes, one GPU: how the keys-per-tile and pipeline
depth constants of kernels/flash_attention.cu were chosen.

Run:  python -m bench.flash_tile_sweep --decode 16x2,16x4 --prefill 32x2,32x3 --out bench/results/flash_tiles.json

Each value is keys per tile, optionally x tiles in flight (BK and STAGES; 2 when left
out). For each it compiles a copy of the kernels with those constants (decode shape
KW = 4, or prefill shape KW = 1) and times CudaOps.paged_attention (CUDA events, Llama-3-8B heads:
32 query, 8 KV, head_dim 128, fp16, blocks of 16): decode batches 1-256 at 512 keys
(with the split target of 1-8 blocks an SM) and prefills of 2048 / 8192 tokens and 16 x 128.
Decode timings of small batches include the host's launch overhead (the call is not graphed).
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
from tp_decode import gpu_seconds  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def ops_with_tiles(decode: tuple[int, int], prefill: tuple[int, int]):
    """CudaOps whose flash kernel uses these (keys per tile, stages) for the decode and
    prefill shapes (a patched copy of the sources)."""
    import shardline.kernels.cuda_attention as attention
    import shardline.kernels.cuda_common as common
    from shardline.kernels.cuda_ops import CudaOps
    source_dir = Path(common.__file__).resolve().parent
    folder = Path(tempfile.mkdtemp())
    for f in source_dir.glob("*.cu"):
        shutil.copy(f, folder / f.name)
    text = (folder / "flash_attention.cu").read_text()
    for constant, (prefill_value, decode_value) in (("BK", (prefill[0], decode[0])),
                                                    ("STAGES", (prefill[1], decode[1]))):
        text, count = re.subn(rf"constexpr int {constant} = KW == 1 \? \d+ : \d+;",
                              f"constexpr int {constant} = KW == 1 ? {prefill_value} : {decode_value};", text)
        assert count == 1, f"flash_attention.cu no longer has the {constant} line this sweep patches"
    (folder / "flash_attention.cu").write_text(text)

    def smem(head_dim: int, key_warps: int) -> int:
        keys, stages = prefill if key_warps == 1 else decode
        return max(key_warps * stages * 2 * keys * (head_dim + 8) * 2,
                   (2 * key_warps * 16 + key_warps * 16 * head_dim) * 4)
    common._KERNEL_DIR, common.flash_smem_bytes, attention.flash_smem_bytes = folder, smem, smem
    return CudaOps(0)


def cache(rng, seqs: int, tokens: int, contiguous: bool):
    import cupy
    num_blocks = seqs * tokens // BLOCK
    k, v = (cupy.asarray(rng.standard_normal((num_blocks, BLOCK, KV_HEADS, HEAD_DIM), dtype=np.float32))
            .astype(cupy.float16) for _ in range(2))
    order = np.arange(num_blocks) if contiguous else rng.permutation(num_blocks)
    return k, v, cupy.asarray(order.reshape(seqs, tokens // BLOCK).astype(np.int32)), \
        cupy.full(seqs, tokens, dtype=cupy.int32)


def sweep(ops, rng, decode: tuple[int, int], prefill: tuple[int, int]) -> list[dict]:
    import cupy
    rows, sms = [], ops._multiprocessors
    for batch in (1, 16, 64, 256):
        k, v, tables, seq_lens = cache(rng, batch, 512, contiguous=False)
        q = cupy.asarray(rng.standard_normal((batch, HEADS, HEAD_DIM), dtype=np.float32)).astype(cupy.float16)
        qsl = cupy.arange(batch + 1, dtype=cupy.int32)
        for target in (1, 2, 4, 8):   # blocks an SM the key splits aim at (the kernel's default: 2)
            ops._multiprocessors = sms * target // 2
            s = gpu_seconds(lambda: ops.paged_attention(q, k, v, tables, seq_lens, qsl, 0.088), reps=50)
            rows.append({"decode_bk": decode[0], "decode_stages": decode[1], "batch": batch,
                         "split_target": target, "us": s * 1e6, "GBps": 2 * k.nbytes / s / 1e9})
        ops._multiprocessors = sms
    for seqs, tokens in ((1, 2048), (1, 8192), (16, 128)):
        k, v, tables, seq_lens = cache(rng, seqs, tokens, contiguous=True)
        q = cupy.asarray(rng.standard_normal((seqs * tokens, HEADS, HEAD_DIM), dtype=np.float32)).astype(cupy.float16)
        qsl = cupy.arange(seqs + 1, dtype=cupy.int32) * tokens
        s = gpu_seconds(lambda: ops.paged_attention(q, k, v, tables, seq_lens, qsl, 0.088), reps=10)
        flops = seqs * 4 * HEAD_DIM * HEADS * tokens * (tokens + 1) / 2
        rows.append({"prefill_bk": prefill[0], "prefill_stages": prefill[1], "seqs": seqs, "tokens": tokens,
                     "us": s * 1e6, "TFLOPs": flops / s / 1e12})
    return rows


def _shapes(text: str) -> list[tuple[int, int]]:
    """"16x4,32" -> [(16, 4), (32, 2)]: keys per tile, stages (2 when left out)."""
    return [(int(v.split("x")[0]), int(v.split("x")[1]) if "x" in v else 2) for v in text.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decode", default="16x2,16x4", help="keys per tile [x stages] of the decode shape to try")
    p.add_argument("--prefill", default="32x2,32x3", help="keys per tile [x stages] of the prefill shape to try")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    decode, prefill = _shapes(args.decode), _shapes(args.prefill)
    rows = []
    for i in range(max(len(decode), len(prefill))):   # pairs, the shorter list repeating its last value
        pair = decode[min(i, len(decode) - 1)], prefill[min(i, len(prefill) - 1)]
        rows += sweep(ops_with_tiles(*pair), rng, *pair)
    for r in rows:
        print(json.dumps(r))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
