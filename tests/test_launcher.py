"""LocalLauncher failures: a worker that exits before registering, or one
that does not register in time, gives an error naming the group with the
tail of its stderr, and no process is left behind."""

from __future__ import annotations

import asyncio
import os

import pytest
import yaml

from shardline.coordinator.launcher import LaunchError, LocalLauncher
from shardline.coordinator.registry import Registry


def write_config(folder, model: str) -> str:
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump({"model": model, "engine": {"backend": "numpy"},
                                    "groups": [{"name": "g", "replicas": 2}]}))
    return str(path)


def launch_and_wait(config_path: str, timeout_s: float) -> tuple[str, list[int]]:
    async def main():
        registry = Registry(heartbeat_timeout_s=3.0)
        # Nothing listens on port 9 (discard): the workers cannot register.
        launcher = LocalLauncher(config_path, ["g-0", "g-1"], "127.0.0.1:9")
        launcher.start()
        pids = [p.process.pid for p in launcher.processes.values()]
        with pytest.raises(LaunchError) as err:
            await launcher.wait_ready(registry, timeout_s)
        return str(err.value), pids
    return asyncio.run(main())


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_worker_exiting_early_is_reported_with_its_stderr(tmp_path):
    message, pids = launch_and_wait(write_config(tmp_path, str(tmp_path / "no-such-model.gguf")), 120)
    assert "group g-" in message and "before it registered" in message
    assert "no-such-model.gguf" in message  # the worker's own error, from its stderr
    assert all(gone(pid) for pid in pids)


def test_worker_not_registering_in_time(tmp_path):
    message, pids = launch_and_wait(write_config(tmp_path, "default"), 1.0)
    assert "g-0, g-1 did not register within 1 s" in message and "--- g-0 stderr ---" in message
    assert all(gone(pid) for pid in pids)
