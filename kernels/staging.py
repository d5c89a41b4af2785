"""Many small host arrays to the GPU in one copy.

A step's inputs (token ids, positions, slot mapping, block tables, sampling
parameters: a dozen arrays of a few KB) would each cost a copy and tens of
microseconds of host time, while the GPU waits for the first kernel. Packed
one after another into a pinned staging buffer, they go in one asynchronous
copy into one device allocation, and come back as views into it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def packed_layout(arrays: dict[str, np.ndarray], align: int = 16) -> tuple[dict[str, int], int]:
    """Byte offsets of the arrays packed one after another (each `align`-aligned), and the total."""
    offsets, at = {}, 0
    for name, array in arrays.items():
        offsets[name] = at
        at += -(-array.nbytes // align) * align
    return offsets, at


def views(raw: Any, offsets: dict[str, int], like: dict[str, np.ndarray]) -> dict[str, Any]:
    """`raw` (uint8, NumPy or CuPy) seen as the arrays of `like` at `offsets`."""
    return {name: raw[at:at + like[name].nbytes].view(like[name].dtype).reshape(like[name].shape)
            for name, at in offsets.items()}


class Uploader:
    """Host arrays -> fresh device arrays, in one asynchronous copy on the current stream.

    Two pinned staging buffers are used in turn: the one being filled was last copied out
    two uploads ago, which is waited for (done unless far more is queued). A buffer too
    small is replaced only after that wait, so no copy ever reads freed pinned memory."""

    def __init__(self):
        self._host: list[np.ndarray | None] = [None, None]
        self._copied: list[Any] = [None, None]
        self._turn = 0

    def __call__(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        import cupy
        import cupyx
        arrays = {name: np.asarray(array, order="C") for name, array in arrays.items()}   # 0-d stays 0-d
        offsets, nbytes = packed_layout(arrays)
        device = cupy.empty(nbytes, np.uint8)
        if nbytes:
            slot = self._turn % 2
            self._turn += 1
            if self._copied[slot] is not None:
                self._copied[slot].synchronize()
            host = self._host[slot]
            if host is None or host.nbytes < nbytes:
                host = self._host[slot] = cupyx.empty_pinned(max(2 * nbytes, 1 << 16), np.uint8)
            for name, array in arrays.items():
                host[offsets[name]:offsets[name] + array.nbytes] = array.reshape(-1).view(np.uint8)
            stream = cupy.cuda.get_current_stream()
            device.set(host[:nbytes], stream=stream)
            self._copied[slot] = stream.record()
        return views(device, offsets, arrays)
