"""Decode step time of one engine under CudaOps settings switched in place: an A/B of kernel
choices without rebuilding the engine (the graphs are recaptured for each setting).

Run:  python -m bench.decode_ab --shape llama3-8b --batch 1,16 \\
          --config 'k1={"skinny_k_split": 1}' --config 'tuned={"skinny_k_split": null}'

Each --config is NAME=JSON of CudaOps attributes (decode_tiles as a SHARDLINE_FLASH_DECODE_TILES
string; a tile never compiled falls back to the next in the table); attributes a setting does
not name keep their defaults. The settings run in turn, --reps times over, each a median of
--steps engine steps at --context tokens (decode ahead on, as bench.llm runs them). With
--ttft-reads N, each setting's turn also reads the TTFT of a --ttft-tokens prompt N times (the
median, as bench.llm; batch 0 in the rows). Settings compare only within one run: the same
machine, the same engine. Writes JSON rows (shape, config, batch, rep, step_ms or ttft_ms).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm import GPU_MEMORY_FRACTION, SHAPES, build_ours, decode_step_s, median_ttft, skinny_k_splits  # noqa: E402


def parse_config(text: str) -> tuple[str, dict]:
    """'name={"attr": value}' -> (name, {attr: value}); decode_tiles parsed as the env var is."""
    name, _, body = text.partition("=")
    attrs = json.loads(body)
    if "decode_tiles" in attrs:
        from shardline.kernels.cuda_common import _decode_tiles   # CuPy: only for a CUDA setting
        attrs["decode_tiles"] = _decode_tiles(attrs["decode_tiles"])
    return name, attrs


class Settings:
    """The --config settings of CudaOps attributes, applied in turn to one ops object; what a
    setting does not name goes back to the value the ops had before the first."""

    def __init__(self, ops, texts: list[str]):
        self.ops, self.configs = ops, dict(parse_config(text) for text in texts)
        self.defaults = {attr: getattr(ops, attr) for attrs in self.configs.values() for attr in attrs}

    def apply(self, name: str) -> None:
        for attr, value in {**self.defaults, **self.configs[name]}.items():
            setattr(self.ops, attr, value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1])
    p.add_argument("--config", action="append", required=True, help="NAME=JSON of CudaOps attributes")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--ttft-reads", type=int, default=0, help="TTFT reads a setting's turn (0: none)")
    p.add_argument("--ttft-tokens", type=int, default=2048)
    p.add_argument("--out", default="bench/results/decode_ab.json")
    args = p.parse_args()
    args.max_num_seqs, args.decode_ahead = max(args.batch), None
    args.gpu_memory_fraction = GPU_MEMORY_FRACTION
    backend, engine = build_ours(SHAPES[args.shape], args)
    settings = Settings(backend.ops, args.config)
    rng, rows = np.random.default_rng(0), []
    for rep in range(args.reps):
        for name in settings.configs:
            settings.apply(name)
            engine.runner.graphs.close()   # recaptured under the new setting
            for batch in args.batch:
                seconds = decode_step_s(engine, batch, args.context, args.steps, rng)
                rows.append({"shape": args.shape, "config": name, "batch": batch, "rep": rep,
                             "step_ms": round(seconds * 1e3, 3)})
                print(json.dumps(rows[-1]), flush=True)
            if args.ttft_reads:
                prompt = rng.integers(0, engine.local.model.config.vocab_size, args.ttft_tokens).tolist()
                ttft, _ = median_ttft(engine, prompt, args.ttft_reads)   # warmed up under this setting
                rows.append({"shape": args.shape, "config": name, "batch": 0, "rep": rep,
                             "ttft_ms": round(float(ttft) * 1e3, 3)})
                print(json.dumps(rows[-1]), flush=True)
    # The skinny GEMMs' K splits this process timed (they are picked once a process: a figure
    # that differs by process may come from them)
    rows.append({"shape": args.shape, "skinny_k_splits": skinny_k_splits(backend.ops)})
    print(json.dumps(rows[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
