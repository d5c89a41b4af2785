"""A disk cache for kernels NVRTC builds outside CuPy (cuda_common._compile_for_arch): CuPy
caches the modules it builds, not these. One JSON file a build, named by a digest of
everything that goes into it, in CuPy's cache folder (CUPY_CACHE_DIR, else
~/.cupy/kernel_cache). No cupy import here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def cache_path(*parts) -> Path:
    """Where the build of `parts` (source, options, target, compiler version, ...) is kept."""
    digest = hashlib.sha256(repr(parts).encode()).hexdigest()[:40]
    root = Path(os.environ.get("CUPY_CACHE_DIR") or Path.home() / ".cupy" / "kernel_cache")
    return root / f"shardline_{digest}.json"


def cached_build(path: Path, build: Callable[[], tuple[bytes, dict[str, str]]]) -> tuple[bytes, dict[str, str]]:
    """(cubin, {name expression: lowered name}) from `path`, or from build() and then kept
    there. An unreadable or damaged file (the cubin's sha256 is kept with it) is built again;
    a cache that cannot be written is left as it is."""
    try:
        data = json.loads(path.read_text())
        cubin = base64.b64decode(data["cubin"], validate=True)
        if hashlib.sha256(cubin).hexdigest() == data["sha256"]:
            return cubin, dict(data["lowered"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    cubin, lowered = build()
    entry = {"cubin": base64.b64encode(cubin).decode(), "sha256": hashlib.sha256(cubin).hexdigest(),
             "lowered": lowered}
    scratch = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(handle, "w") as file:
            json.dump(entry, file)
        os.replace(scratch, path)   # whole or not at all, for processes building at once
    except OSError:
        if scratch is not None:
            Path(scratch).unlink(missing_ok=True)
    return cubin, lowered


def forget(path: Path) -> None:
    """Drops a kept build (one its driver would not load)."""
    path.unlink(missing_ok=True)
