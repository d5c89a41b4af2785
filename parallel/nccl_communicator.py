"""GPU collectives over NCCL (through cupy.cuda.nccl), on the current stream.

The group's unique id is made by rank 0 and handed out with an MPI
broadcast of its 128 raw bytes. Every call is issued on CuPy's current
stream, so a captured CUDA graph contains it; one eager all-reduce at
construction warms the communicator up (NCCL calls capture only after a
first eager collective on that communicator). Arrays are cupy arrays in
the storage dtype (bf16 as uint16 bits, reduced as NCCL bfloat16).

`all_to_all_v` is grouped point-to-point (groupStart/groupEnd around one
send and one recv per peer). Exchanging the counts syncs the host (the
receiver sizes its buffer from them), so a dispatch is not graph-capturable
unless the caller passes `recv_counts`. Not yet run on a GPU.
"""

from __future__ import annotations

from typing import Any

import cupy
import numpy as np
from cupy.cuda import nccl

from shardline.parallel.communicator import check_send_counts

_NCCL_BFLOAT16 = 9  # ncclBfloat16 in nccl.h (NCCL >= 2.10); cupy has no name for it
_UNIQUE_ID_BYTES = 128  # NCCL_UNIQUE_ID_BYTES
_NCCL_TYPES = {
    np.dtype(np.float32): nccl.NCCL_FLOAT32,
    np.dtype(np.float16): nccl.NCCL_FLOAT16,
    np.dtype(np.uint16): _NCCL_BFLOAT16,
    np.dtype(np.float64): nccl.NCCL_FLOAT64,
    np.dtype(np.int32): nccl.NCCL_INT32,
    np.dtype(np.int64): nccl.NCCL_INT64,
}


def _nccl_type(x) -> int:
    try:
        return _NCCL_TYPES[np.dtype(x.dtype)]
    except KeyError:
        raise ValueError(f"NCCL: unsupported dtype {x.dtype}") from None


def unique_id_to_bytes(uid) -> bytes:
    """CuPy hands the unique id out as bytes (recent versions) or as a tuple
    of ints (older ones) and wants the same type back: one flag byte (1:
    bytes) and the 128 raw bytes."""
    raw = np.frombuffer(uid, dtype=np.uint8) if isinstance(uid, bytes) else \
        np.asarray(uid, dtype=np.int64).astype(np.uint8)
    return bytes([int(isinstance(uid, bytes))]) + raw.tobytes()


def unique_id_from_bytes(data: bytes):
    if len(data) != 1 + _UNIQUE_ID_BYTES:
        raise ValueError(f"unique_id: {len(data)} bytes, expected {1 + _UNIQUE_ID_BYTES}")
    raw = np.frombuffer(data[1:], dtype=np.uint8)
    return raw.tobytes() if data[0] else tuple(int(b) for b in raw.astype(np.int8))


def _shared_unique_id(mpi_comm: Any):
    """Rank 0's NCCL unique id on every rank, by an MPI broadcast."""
    message = np.zeros(1 + _UNIQUE_ID_BYTES, dtype=np.uint8)
    if mpi_comm.Get_rank() == 0:
        message[:] = np.frombuffer(unique_id_to_bytes(nccl.get_unique_id()), dtype=np.uint8)
    mpi_comm.Bcast(message, root=0)
    return unique_id_from_bytes(message.tobytes())


class NCCLCommunicator:
    def __init__(self, mpi_comm: Any):
        self.rank, self.size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        self.comm = nccl.NcclCommunicator(self.size, _shared_unique_id(mpi_comm), self.rank)
        self.all_reduce(cupy.ones(16, dtype=cupy.float32))  # eager warm-up (see module docstring)
        cupy.cuda.get_current_stream().synchronize()

    @staticmethod
    def _stream() -> int:
        return cupy.cuda.get_current_stream().ptr

    def all_reduce(self, x):
        x = cupy.ascontiguousarray(x)
        out = cupy.empty_like(x)
        self.comm.allReduce(x.data.ptr, out.data.ptr, x.size, _nccl_type(x), nccl.NCCL_SUM, self._stream())
        return out

    def all_gather(self, x, axis: int = -1):
        axis = axis % x.ndim
        front = cupy.ascontiguousarray(cupy.moveaxis(x, axis, 0))  # [n, ...]
        out = cupy.empty((self.size,) + front.shape, dtype=x.dtype)
        self.comm.allGather(front.data.ptr, out.data.ptr, front.size, _nccl_type(x), self._stream())
        gathered = out.reshape((self.size * front.shape[0],) + front.shape[1:])
        return cupy.ascontiguousarray(cupy.moveaxis(gathered, 0, axis))

    def reduce_scatter(self, x, axis: int = 0):
        axis = axis % x.ndim
        front = cupy.ascontiguousarray(cupy.moveaxis(x, axis, 0))
        if front.shape[0] % self.size:
            raise ValueError(f"reduce_scatter: dimension {front.shape[0]} is not divisible by {self.size} ranks")
        out = cupy.empty((front.shape[0] // self.size,) + front.shape[1:], dtype=x.dtype)
        self.comm.reduceScatter(front.data.ptr, out.data.ptr, out.size, _nccl_type(x), nccl.NCCL_SUM,
                                self._stream())
        return cupy.ascontiguousarray(cupy.moveaxis(out, 0, axis))

    def broadcast(self, x, root: int = 0):
        out = cupy.ascontiguousarray(x).copy()
        self.comm.bcast(out.data.ptr, out.size, _nccl_type(out), root, self._stream())
        return out

    def send(self, x, dst: int) -> None:
        x = cupy.ascontiguousarray(x)
        self.comm.send(x.data.ptr, x.size, _nccl_type(x), dst, self._stream())

    def recv(self, like, src: int):
        out = cupy.empty_like(like)
        self.comm.recv(out.data.ptr, out.size, _nccl_type(out), src, self._stream())
        return out

    def all_to_all_v(self, send, send_counts, recv_counts=None):
        check_send_counts(send.shape[0], send_counts, self.size)
        if recv_counts is None:
            recv_counts = self._exchange_counts(send_counts)
        send = cupy.ascontiguousarray(send)
        row_elems = int(np.prod(send.shape[1:], dtype=np.int64))
        out = cupy.empty((int(sum(recv_counts)),) + send.shape[1:], dtype=send.dtype)
        self._grouped_exchange(send, list(send_counts), out, list(recv_counts), row_elems)
        return out, [int(c) for c in recv_counts]

    def _exchange_counts(self, send_counts) -> list[int]:
        sent = cupy.asarray(np.asarray(send_counts, dtype=np.int64))
        received = cupy.empty(self.size, dtype=cupy.int64)
        self._grouped_exchange(sent, [1] * self.size, received, [1] * self.size, 1)
        return [int(c) for c in received.get()]  # host sync: the caller sizes buffers from these

    def _grouped_exchange(self, send, send_rows: list[int], out, recv_rows: list[int], row_elems: int) -> None:
        """Rows [offset, +count) to / from each peer, all in one NCCL group."""
        dtype, stream, row_bytes = _nccl_type(send), self._stream(), row_elems * send.dtype.itemsize
        send_at, recv_at = 0, 0
        nccl.groupStart()
        try:
            for peer in range(self.size):
                if send_rows[peer]:
                    self.comm.send(send.data.ptr + send_at * row_bytes, send_rows[peer] * row_elems, dtype,
                                   peer, stream)
                if recv_rows[peer]:
                    self.comm.recv(out.data.ptr + recv_at * row_bytes, recv_rows[peer] * row_elems, dtype,
                                   peer, stream)
                send_at, recv_at = send_at + send_rows[peer], recv_at + recv_rows[peer]
        finally:
            nccl.groupEnd()

    def barrier(self) -> None:
        self.all_reduce(cupy.zeros(1, dtype=cupy.float32))
        cupy.cuda.get_current_stream().synchronize()
