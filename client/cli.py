"""The `shardline` command line.

`shardline generate "prompt"` streams a continuation to stdout (the prompt
is not echoed); progress and errors go to stderr. Model loading is
imported lazily so the CLI starts fast and `client/` stays free of model
code at import time.
"""

from __future__ import annotations

import argparse
import sys


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate a continuation of a prompt")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--model", help="HF checkpoint folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 means no top-k cut")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--backend", choices=["auto", "numpy", "cuda"], default="auto")
    p.add_argument("--dtype", default=None, help="numpy: float32|float64; cuda: bfloat16|float16|float32")


def _params(args):
    from shardline.worker.sampling_params import SamplingParams
    extra = {} if args.seed is None else {"seed": args.seed}
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, ignore_eos=args.ignore_eos, **extra)


def cmd_generate(args) -> int:
    from shardline.models.errors import ModelLoadError
    from shardline.worker.offline import load_local, stream_text
    try:
        params = _params(args)
        local = load_local(args.model, args.backend, args.dtype)
        for delta in stream_text(local, args.prompt, params, chat=args.chat):
            sys.stdout.write(delta)
            sys.stdout.flush()
    except (ModelLoadError, ValueError) as err:
        print(f"\nshardline: error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardline", description="shardline LLM inference runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    args = parser.parse_args(argv)
    return {"generate": cmd_generate}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
