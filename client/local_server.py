"""Runs `shardline serve` as a child process for the demo and the load
benchmark: a temporary copy of a cluster config with a free port, its own
process group, a ready file to learn the real address, and a stop that
leaves no process behind (SIGTERM to the group, then SIGKILL).

Process management only: it imports no coordinator, worker or model code
(the server runs in the child) and talks no gRPC.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import yaml

SERVE_COMMAND = (sys.executable, "-m", "shardline.client.cli", "serve")  # -c FILE --ready-file PATH follow
_ADDRESS = re.compile(r"^\S+:\d+$")
_POLL_S = 0.1


class ServerStartError(RuntimeError):
    """The server exited or did not become ready; the message ends with the
    tail of its output."""


def free_port_config(config_path: str | Path, out_dir: Path, overrides: dict | None = None) -> Path:
    """A copy of the cluster config in `out_dir` with the client port set to
    0 (the server picks a free one) and Prometheus metrics off, so it never
    collides with a running cluster. `overrides` are merged per top-level
    key (`{"engine": {"backend": "numpy"}}`)."""
    try:
        data = yaml.safe_load(Path(config_path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{config_path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{config_path}: expected a mapping at the top level")
    coordinator = dict(data.get("coordinator") or {})
    coordinator.update(port=0, metrics_port=None)
    data["coordinator"] = coordinator
    for key, value in (overrides or {}).items():
        data[key] = {**(data.get(key) or {}), **value} if isinstance(value, dict) else value
    _absolute_paths(data, Path(config_path).resolve().parent)
    out = out_dir / "cluster.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def _absolute_paths(data: dict, config_dir: Path) -> None:
    """Relative file paths in the config still name the same files from the
    copy's folder: TLS files are read relative to the config's folder, the
    model relative to the working directory (as the server reads them)."""
    def fix(value: str, *bases: Path) -> str:
        for base in bases:
            if (base / value).exists():
                return str((base / value).resolve())
        return value

    if isinstance(data.get("model"), str) and data["model"] != "default":
        data["model"] = fix(data["model"], Path.cwd(), config_dir)
    tls = (data.get("coordinator") or {}).get("tls")
    if isinstance(tls, dict):
        for key in ("cert_file", "key_file"):
            if isinstance(tls.get(key), str):
                tls[key] = fix(tls[key], config_dir)


class LocalServer:
    """`shardline serve` in a child process. Use as a context manager:
    entering starts it and waits for its ready file; leaving stops it."""

    def __init__(self, config_path: str | Path, *, startup_timeout_s: float = 300.0,
                 overrides: dict | None = None, env: dict | None = None, command: Sequence[str] | None = None):
        self._tmp = tempfile.TemporaryDirectory(prefix="shardline-")
        tmp = Path(self._tmp.name)
        self.config_path = free_port_config(config_path, tmp, overrides)
        self.ready_file = tmp / "ready"
        self.log_path = tmp / "server.log"
        self.startup_timeout_s = startup_timeout_s
        self._env = env
        self._command = list(command or SERVE_COMMAND)
        self.process: subprocess.Popen | None = None
        self.address = ""

    def start(self) -> str:
        """Starts the server and returns its "host:port" once ready."""
        cmd = [*self._command, "-c", str(self.config_path), "--ready-file", str(self.ready_file)]
        with open(self.log_path, "wb") as log:
            # A session of its own: Ctrl-C in our terminal reaches only us, and
            # we stop the whole group (coordinator and workers) in order.
            self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, env=self._env)
        self.address = self._wait_ready()
        return self.address

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServerStartError(f"the server exited with code {code} before it was ready"
                                       + self._tail_text())
            text = self.ready_file.read_text().strip() if self.ready_file.exists() else ""
            if _ADDRESS.match(text):
                return text
            time.sleep(_POLL_S)
        raise ServerStartError(f"the server was not ready within {self.startup_timeout_s:g} s"
                               + self._tail_text())

    def tail(self, num_lines: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-num_lines:])

    def _tail_text(self) -> str:
        tail = self.tail()
        return f"; its output ends with:\n{tail}" if tail else " (it printed nothing)"

    def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM to the server's process group, SIGKILL after `grace_s`.
        Returns the server's exit code (None if it never started)."""
        proc, self.process = self.process, None
        if proc is None:
            return None
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                pass  # a second Ctrl-C while we wait means: kill it now
        # Whatever is left of the group (workers the server did not reap) goes too.
        _signal_group(proc.pid, signal.SIGKILL)
        code = proc.wait()
        return code

    def __enter__(self) -> "LocalServer":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self._tmp.cleanup()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def terminate_on_sigterm():
    """Turns SIGTERM into SystemExit in this process, so `finally` blocks
    (and `LocalServer.__exit__`) run when we are terminated. Returns the
    previous handler, for `signal.signal(signal.SIGTERM, previous)`."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, handler)
