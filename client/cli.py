"""The `shardline` command line.

- `shardline generate "prompt"` streams a continuation to stdout (the prompt
  is not echoed): in this process from a local model, or with `--url` from a
  running cluster over gRPC.
- `shardline serve -c cluster.yaml [--launcher ray]` runs a coordinator and
  its engine groups (on this machine, or on a Ray cluster).
- `srun shardline leader -c cluster.yaml` runs Slurm leader mode: every
  rank of the job, global rank 0 with the coordinator.
- `shardline status --url HOST:PORT` prints the cluster's stats.
- `shardline demo` starts a local cluster, asks it one question, stops it.

Progress and errors go to stderr; a bad request or config exits with 2 and
a one-line message. Model, worker and coordinator code is imported lazily,
only by the command that needs it, so the CLI starts fast and `client/`
stays free of model code at import time.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEMO_PROMPT = "What is the capital of France?"
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def _error(message: str, newline: bool = False) -> int:
    print(("\n" if newline else "") + f"shardline: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _add_connection(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--url", required=required, metavar="HOST:PORT",
                   help="a running cluster's client address" + ("" if required else " (default: run locally)"))
    p.add_argument("--token", default=os.environ.get("SHARDLINE_TOKEN"),
                   help="bearer token for the cluster (default: $SHARDLINE_TOKEN)")
    p.add_argument("--ca-cert", metavar="PEM", help="use TLS, trusting this CA certificate")
    p.add_argument("--tls", action="store_true", help="use TLS with the system's CA certificates")
    p.add_argument("--timeout-s", type=float, default=None, help="deadline of the call in seconds")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate a continuation of a prompt")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--model", help="local: HF checkpoint folder or .gguf file (default: embedded "
                                   "SmolLM2-135M-Instruct); with --url: the served model name")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 means no top-k cut")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable; with --url)")
    p.add_argument("--backend", choices=["auto", "numpy", "cuda"], default="auto", help="local only")
    p.add_argument("--dtype", default=None, help="local only; numpy: float32|float64; cuda: bfloat16|float16|float32")
    _add_connection(p, required=False)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run a coordinator and its engine groups from a cluster config")
    p.add_argument("-c", "--config", required=True, metavar="FILE", help="cluster config YAML")
    p.add_argument("--ready-file", metavar="PATH", help='write "host:port" here once every group is ready')
    p.add_argument("--launcher", choices=["local", "ray"], default=None,
                   help="how to start the groups (default: the config's `launcher`)")
    p.add_argument("--address", metavar="RAY_ADDRESS", default=None,
                   help="with --launcher ray: 'auto' (a running cluster), 'local' (start one here), "
                        "or host:port (default: the config's ray.address)")


def _add_leader(sub) -> None:
    p = sub.add_parser("leader", help="Slurm leader mode: run as every rank of `srun shardline leader`")
    p.add_argument("-c", "--config", required=True, metavar="FILE", help="cluster config YAML")
    p.add_argument("--address-file", metavar="PATH",
                   help='global rank 0 writes the coordinator\'s "host:port" here once every group is ready')


def _add_status(sub) -> None:
    p = sub.add_parser("status", help="print a running cluster's stats")
    _add_connection(p, required=True)
    p.add_argument("--plain", action="store_true", help="plain text even if rich is installed")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="start a local cluster, stream one chat answer from it, stop it")
    p.add_argument("-c", "--config", default="cluster_configs/local.yaml", metavar="FILE")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--startup-timeout-s", type=float, default=300.0)


def _params(args):
    from shardline.worker.sampling_params import SamplingParams
    extra = {} if args.seed is None else {"seed": args.seed}
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, ignore_eos=args.ignore_eos, **extra)


def _generate_local(args) -> int:
    if args.stop:  # the in-process generator has no detokenizing stop-string check
        return _error("--stop needs --url (a cluster); local generation does not stop on strings")
    from shardline.models.errors import ModelLoadError
    from shardline.worker.offline import load_local, stream_text
    try:
        params = _params(args)
        local = load_local(args.model, args.backend, args.dtype)
        for delta in stream_text(local, args.prompt, params, chat=args.chat):
            sys.stdout.write(delta)
            sys.stdout.flush()
    except (ModelLoadError, ValueError) as err:
        return _error(str(err), newline=True)
    sys.stdout.write("\n")
    return 0


def _client(args):
    from shardline.client.client import ShardlineClient
    root = Path(args.ca_cert).read_bytes() if args.ca_cert else None
    return ShardlineClient(args.url, token=args.token, root_certificates=root, tls=args.tls,
                           timeout_s=args.timeout_s)


def _generate_remote(args) -> int:
    from shardline.client.client import ShardlineError
    options = dict(model=args.model or "", chat=args.chat, max_tokens=args.max_tokens,
                   temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                   stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    try:
        with _client(args) as client, client.generate(args.prompt, **options) as stream:
            for chunk in stream:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    except ShardlineError as err:
        return _error(f"{err.code}: {err.message}", newline=True)
    except (OSError, ValueError) as err:
        return _error(str(err), newline=True)
    sys.stdout.write("\n")
    return 0


def cmd_generate(args) -> int:
    try:
        return _generate_remote(args) if args.url else _generate_local(args)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return EXIT_INTERRUPTED


def cmd_serve(args) -> int:
    try:
        from shardline.coordinator.server import serve
    except ModuleNotFoundError as err:
        if err.name != "shardline.coordinator.server":
            raise
        return _error("this installation has no coordinator (shardline.coordinator.server is missing)")
    return serve(args.config, args.ready_file, launcher=args.launcher, ray_address=args.address)


def cmd_leader(args) -> int:
    from shardline.worker.leader_mode import main as leader_main
    return leader_main(args.config, args.address_file)


def _stats_rows(stats) -> tuple[list[str], list[list[str]]]:
    header = ["group", "role", "healthy", "running", "waiting", "in flight", "KV used",
              "KV blocks free/total", "prefix hits", "preemptions", "routed"]
    rows = [[g.name, g.role, "yes" if g.healthy else "NO", str(g.num_running), str(g.num_waiting),
             str(g.in_flight), f"{g.kv_usage:.1%}", f"{g.num_free_kv_blocks}/{g.num_kv_blocks}",
             f"{g.prefix_hit_rate:.1%}", str(g.num_preemptions), str(g.requests_routed)] for g in stats.groups]
    return header, rows


def _summary_lines(models, stats) -> list[str]:
    lines = [f"model {m.name}: max_model_len {m.max_model_len}, {m.num_groups} group(s)" for m in models]
    lines.append(f"queue depth {stats.queue_depth}, requests total {stats.requests_total}, "
                 f"router prefix hit rate {stats.router_prefix_hit_rate:.1%}")
    return lines


def _print_plain(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _print_rich(header: list[str], rows: list[list[str]]) -> bool:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return False
    console = Console()
    if not console.is_terminal:  # piped: don't squeeze the table into 80 columns
        console = Console(width=200)
    table = Table(*header)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    return True


def cmd_status(args) -> int:
    from shardline.client.client import ShardlineError
    try:
        with _client(args) as client:
            models, stats = client.list_models(), client.stats()
    except ShardlineError as err:
        return _error(f"{err.code}: {err.message}")
    except OSError as err:
        return _error(str(err))
    print("\n".join(_summary_lines(models, stats)))
    header, rows = _stats_rows(stats)
    if args.plain or not _print_rich(header, rows):
        _print_plain(header, rows)
    return 0


def _demo_credentials(server) -> tuple[str | None, bytes | None]:
    """The token and CA certificate a client of the demo cluster needs, from
    its config (`coordinator.auth_token_env`, `coordinator.tls.cert_file`)."""
    import yaml
    coordinator = (yaml.safe_load(server.config_path.read_text()) or {}).get("coordinator") or {}
    token_env = coordinator.get("auth_token_env")
    token = os.environ.get(token_env) if token_env else None
    tls = coordinator.get("tls") or {}
    root = Path(tls["cert_file"]).read_bytes() if tls.get("cert_file") else None
    return token, root


def _demo_ask(server, args) -> None:
    from shardline.client.client import ShardlineClient
    token, root = _demo_credentials(server)
    print(f"shardline demo: cluster ready on {server.address}\n> {args.prompt}", file=sys.stderr)
    with ShardlineClient(server.address, token=token, root_certificates=root) as client:
        client.wait_ready(timeout_s=60.0)
        with client.generate(args.prompt, chat=True, max_tokens=args.max_tokens, temperature=0.0) as stream:
            for chunk in stream:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_demo(args) -> int:
    import signal
    from shardline.client.local_server import terminate_on_sigterm
    previous = terminate_on_sigterm()
    try:
        return _run_demo(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_demo(args) -> int:
    from shardline.client.client import ShardlineError
    from shardline.client.local_server import LocalServer, ServerStartError
    print(f"shardline demo: starting a local cluster from {args.config} ...", file=sys.stderr)
    try:
        with LocalServer(args.config, startup_timeout_s=args.startup_timeout_s) as server:
            _demo_ask(server, args)
            print("shardline demo: stopping the cluster", file=sys.stderr)
    except ServerStartError as err:
        return _error(str(err))
    except ShardlineError as err:
        return _error(f"{err.code}: {err.message}")
    except (OSError, ValueError) as err:
        return _error(str(err))
    except KeyboardInterrupt:
        print("\nshardline demo: interrupted; the cluster was stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


COMMANDS = {"generate": cmd_generate, "serve": cmd_serve, "status": cmd_status, "demo": cmd_demo,
            "leader": cmd_leader}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardline", description="shardline LLM inference runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_generate, _add_serve, _add_status, _add_demo, _add_leader):
        add(sub)
    args = parser.parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
