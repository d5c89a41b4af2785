"""kernels/build_cache.py: the disk cache of kernels NVRTC builds outside CuPy (no GPU needed)."""

from __future__ import annotations

import os

import json

from shardline.kernels.build_cache import cache_path, cached_build, forget


def counting_build(cubin: bytes, lowered: dict):
    calls = []

    def build():
        calls.append(1)
        return cubin, lowered
    return build, calls


def test_second_read_comes_from_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path))
    cubin, lowered = os.urandom(1000), {"k<float, 64>": "_Z1kIfLi64EEvv"}
    path = cache_path("source", ("-arch=sm_90a",), (13, 0))
    assert path.parent == tmp_path
    build, calls = counting_build(cubin, lowered)
    assert cached_build(path, build) == (cubin, lowered)
    assert cached_build(path, build) == (cubin, lowered)
    assert len(calls) == 1
    assert not list(tmp_path.glob("*.tmp"))   # written whole, then renamed


def test_every_part_names_its_own_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path))
    paths = {cache_path("source", "-DA", (13, 0)), cache_path("source2", "-DA", (13, 0)),
             cache_path("source", "-DB", (13, 0)), cache_path("source", "-DA", (13, 1))}
    assert len(paths) == 4


def test_damaged_file_is_built_again(tmp_path):
    path = tmp_path / "entry.json"
    good = cached_build(tmp_path / "good.json", lambda: (b"cubin", {"a": "b"}))
    flipped = json.loads((tmp_path / "good.json").read_text()) | {"cubin": "Y3ViaW4x"}   # b"cubin1": bytes changed
    for damage in ("{not json", '{"cubin": "!!!", "lowered": {}}', '{"lowered": {}}', "[1, 2]", json.dumps(flipped)):
        path.write_text(damage)
        build, calls = counting_build(b"cubin", {"a": "b"})
        assert cached_build(path, build) == (b"cubin", {"a": "b"})
        assert calls == [1], damage
    build, calls = counting_build(b"other", {})
    assert cached_build(path, build) == good and not calls   # the rebuilt entry was kept
    forget(path)
    assert cached_build(path, build) == (b"other", {}) and calls == [1]


def test_unwritable_cache_still_builds(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = blocker / "sub" / "entry.json"   # its parent cannot be made: a file is in the way
    build, calls = counting_build(b"cubin", {})
    assert cached_build(path, build) == (b"cubin", {})
    assert cached_build(path, build) == (b"cubin", {})
    assert len(calls) == 2
