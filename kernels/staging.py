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


class CopyTurns:
    """Two host buffers used in turn for asynchronous reads by the device (a copy, or kernels
    that read pinned memory themselves): before a buffer is refilled, the work that read it two
    turns ago is waited for (done unless far more is queued), so nothing on the device ever
    reads memory that was refilled or freed after it was queued."""

    def __init__(self):
        self._read: list[Any] = [None, None]   # the event after each buffer's last read
        self._turn = 0

    def next(self) -> int:
        """The buffer (0 or 1) to fill now; its last copy out is done."""
        slot = self._turn % 2
        self._turn += 1
        if self._read[slot] is not None:
            self._read[slot].synchronize()
        return slot

    def copy(self, slot: int, host: np.ndarray, device: Any, stream: Any) -> None:
        """`host` (buffer `slot`'s, filled) into `device`, queued on `stream`."""
        device.set(host, stream=stream)
        self.read(slot, stream)

    def read(self, slot: int, stream: Any) -> Any:
        """Buffer `slot` is read by what is queued on `stream` up to now; returns the event
        recorded after it."""
        self._read[slot] = stream.record()
        return self._read[slot]


class Uploader:
    """Host arrays -> fresh device arrays, in one asynchronous copy on the current stream,
    through two pinned staging buffers used in turn (CopyTurns). A buffer too small is
    replaced when its turn comes, after its last copy out is done."""

    def __init__(self):
        self._host: list[np.ndarray | None] = [None, None]
        self._turns = CopyTurns()

    def __call__(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        import cupy
        import cupyx
        arrays = {name: np.asarray(array, order="C") for name, array in arrays.items()}   # 0-d stays 0-d
        offsets, nbytes = packed_layout(arrays)
        device = cupy.empty(nbytes, np.uint8)
        if nbytes:
            slot = self._turns.next()
            host = self._host[slot]
            if host is None or host.nbytes < nbytes:
                host = self._host[slot] = cupyx.empty_pinned(max(2 * nbytes, 1 << 16), np.uint8)
            for name, array in arrays.items():
                host[offsets[name]:offsets[name] + array.nbytes] = array.reshape(-1).view(np.uint8)
            self._turns.copy(slot, host[:nbytes], device, cupy.cuda.get_current_stream())
        # Each view made at its offset in one call: slicing, view and reshape cost three (a
        # dozen arrays' worth was a tenth of a millisecond before the first kernel).
        return {name: cupy.ndarray(arrays[name].shape, arrays[name].dtype, memptr=device.data + at)
                for name, at in offsets.items()}
