"""Shared by the leader-mode tests (mpiexec and Slurm): a cluster config of
groups over the tiny numpy-only checkpoint, waiting for rank 0's address
file, and one streamed completion through the Python client."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import yaml

from shardline.client.client import ShardlineClient

ENGINE = {"backend": "numpy", "num_kv_blocks": 64, "max_num_seqs": 8, "block_size_tokens": 16}
SHARDLINE = str(Path(sys.executable).with_name("shardline"))


def write_leader_config(folder: Path, model: str | Path, groups: list[dict], startup_timeout_s: float = 120) -> Path:
    data = {"model": str(model), "served_model_name": "tiny", "launcher": "slurm", "engine": ENGINE,
            "coordinator": {"host": "127.0.0.1", "port": 0, "heartbeat_interval_s": 0.25,
                            "startup_timeout_s": startup_timeout_s},
            "slurm": {"worker_host": "127.0.0.1", "follower_grace_s": 10}, "groups": groups}
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def wait_for_file(path: Path, timeout_s: float, still_running=lambda: True) -> str | None:
    deadline_s = time.monotonic() + timeout_s
    while time.monotonic() < deadline_s and still_running():
        if path.is_file():
            return path.read_text().strip()
        time.sleep(0.2)
    return path.read_text().strip() if path.is_file() else None


def stream_completion(address: str, num_tokens: int = 8) -> tuple[str, set[str]]:
    """(text of one streamed completion, names of the healthy groups)."""
    with ShardlineClient(address, timeout_s=60) as client:
        client.wait_ready(timeout_s=30)
        with client.generate("Hello from the test", max_tokens=num_tokens, temperature=0.0,
                             ignore_eos=True) as stream:
            chunks = list(stream)
        healthy = {g.name for g in client.stats().groups if g.healthy}
    assert sum(len(c.token_ids) for c in chunks) == num_tokens
    return "".join(c.text for c in chunks), healthy
