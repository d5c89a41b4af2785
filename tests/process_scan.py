"""Finds this machine's processes by their command line (/proc), so launch
tests can check that no rank outlives its launcher."""

from __future__ import annotations

import time
from pathlib import Path


def processes_with(*markers: str) -> list[int]:
    """PIDs of live processes whose command line contains every marker (zombies excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and all(m in command for m in markers):
            found.append(int(entry.name))
    return found


def wait_until_gone(*markers: str, timeout_s: float = 20.0) -> list[int]:
    """[] once no process matches; else the PIDs still there after `timeout_s`."""
    deadline_s = time.monotonic() + timeout_s
    while (left := processes_with(*markers)) and time.monotonic() < deadline_s:
        time.sleep(0.2)
    return left
