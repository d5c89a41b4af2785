"""Shared skip logic for GPU tests: import it first in a `gpu` test module."""

from __future__ import annotations

import pytest

cupy = pytest.importorskip("cupy")
try:
    NUM_GPUS = cupy.cuda.runtime.getDeviceCount()
except Exception:  # no driver at all
    NUM_GPUS = 0
if NUM_GPUS == 0:
    pytest.skip("no CUDA GPU", allow_module_level=True)
