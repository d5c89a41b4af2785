"""The committed gRPC stubs are what grpcio-tools makes from proto/*.proto:
regenerate them into a temp folder and compare byte for byte (run
scripts/gen-proto after editing a .proto)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("grpc_tools")
REPO = Path(__file__).resolve().parents[1]


def test_stubs_are_fresh(tmp_path):
    subprocess.run(["bash", str(REPO / "scripts" / "gen-proto"), str(tmp_path)], check=True, cwd=REPO,
                   env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    fresh = sorted(p.name for p in tmp_path.iterdir())
    committed = sorted(p.name for p in (REPO / "proto").glob("*_pb2*.py*"))
    assert fresh == committed
    stale = [name for name in fresh if (tmp_path / name).read_bytes() != (REPO / "proto" / name).read_bytes()]
    assert not stale, f"stale stubs {stale}: run scripts/gen-proto"
