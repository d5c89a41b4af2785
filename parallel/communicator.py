"""Collectives between the ranks of a group, on backend arrays.

`Communicator` is what sharded layers call: all_reduce (sum), all_gather,
reduce_scatter, broadcast, send/recv, all_to_all_v (expert dispatch) and
barrier. `SingleRank` is the trivial group of one (no copies, no calls);
`MPICommunicator` runs the same operations on NumPy host arrays through
mpi4py for the CPU backend; `parallel/nccl_communicator.py` has the GPU one. Buffers are exchanged as
raw arrays (never pickled); every rank must pass equal shapes, except to
all_to_all_v, whose row counts differ per rank and are exchanged first.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np


class Communicator(Protocol):
    rank: int
    size: int

    def all_reduce(self, x: Any) -> Any: ...

    def all_gather(self, x: Any, axis: int = -1) -> Any: ...

    def reduce_scatter(self, x: Any, axis: int = 0) -> Any: ...

    def broadcast(self, x: Any, root: int = 0) -> Any: ...

    def send(self, x: Any, dst: int) -> None: ...

    def recv(self, like: Any, src: int) -> Any: ...

    def all_to_all_v(self, send: Any, send_counts: Sequence[int],
                     recv_counts: Sequence[int] | None = None) -> tuple[Any, list[int]]:
        """send [sum(send_counts), ...]: rows [sum(send_counts[:j]), +send_counts[j])
        go to rank j, in order. Returns (received rows [sum(recv_counts), ...],
        ordered by source rank; recv_counts). Pass `recv_counts` when already
        known (the return trip of a dispatch) to skip the count exchange."""
        ...

    def barrier(self) -> None: ...


class SingleRank:
    """A group of one: every collective is the identity."""

    rank, size = 0, 1

    def all_reduce(self, x):
        return x

    def all_gather(self, x, axis=-1):
        return x

    def reduce_scatter(self, x, axis=0):
        return x

    def broadcast(self, x, root=0):
        return x

    def send(self, x, dst):
        raise ValueError(f"send: a single-rank group has no rank {dst}")

    def recv(self, like, src):
        raise ValueError(f"recv: a single-rank group has no rank {src}")

    def all_to_all_v(self, send, send_counts, recv_counts=None):
        check_send_counts(send.shape[0], send_counts, 1)
        return send, [int(send_counts[0])]

    def barrier(self) -> None:
        return None


def check_send_counts(num_rows: int, send_counts: Sequence[int], size: int) -> None:
    if len(send_counts) != size or any(c < 0 for c in send_counts) or sum(send_counts) != num_rows:
        raise ValueError(f"all_to_all_v: send_counts {list(send_counts)} must be {size} non-negative "
                         f"counts summing to the {num_rows} rows sent")


def _offsets(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(counts.dtype)


def _element_counts(row_counts: np.ndarray, row_elems: int) -> np.ndarray:
    """MPI's Alltoallv takes int32 element counts and offsets."""
    counts = row_counts * row_elems
    if counts.sum() >= 2**31:
        raise ValueError(f"all_to_all_v: {int(counts.sum())} elements exceed MPI's int32 counts")
    return counts.astype(np.int32)


def _front(x: np.ndarray, axis: int) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(x, axis, 0))


class MPICommunicator:
    """Host-array collectives over an mpi4py communicator (CPU backend)."""

    def __init__(self, comm: Any):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()

    def all_reduce(self, x: np.ndarray) -> np.ndarray:
        out = np.empty_like(x)
        self.comm.Allreduce(np.ascontiguousarray(x), out)
        return out

    def all_gather(self, x: np.ndarray, axis: int = -1) -> np.ndarray:
        axis = axis % x.ndim
        front = _front(x, axis)  # [n, ...] per rank
        out = np.empty((self.size,) + front.shape, dtype=x.dtype)
        self.comm.Allgather(front, out)
        gathered = out.reshape((self.size * front.shape[0],) + front.shape[1:])
        return np.moveaxis(gathered, 0, axis)

    def reduce_scatter(self, x: np.ndarray, axis: int = 0) -> np.ndarray:
        axis = axis % x.ndim
        front = _front(x, axis)
        if front.shape[0] % self.size:
            raise ValueError(f"reduce_scatter: dimension {front.shape[0]} is not divisible by {self.size} ranks")
        out = np.empty((front.shape[0] // self.size,) + front.shape[1:], dtype=x.dtype)
        self.comm.Reduce_scatter_block(front, out)
        return np.moveaxis(out, 0, axis)

    def broadcast(self, x: np.ndarray, root: int = 0) -> np.ndarray:
        out = np.ascontiguousarray(x).copy()
        self.comm.Bcast(out, root=root)
        return out

    def send(self, x: np.ndarray, dst: int) -> None:
        self.comm.Send(np.ascontiguousarray(x), dest=dst)

    def recv(self, like: np.ndarray, src: int) -> np.ndarray:
        out = np.empty_like(like)
        self.comm.Recv(out, source=src)
        return out

    def all_to_all_v(self, send: np.ndarray, send_counts: Sequence[int],
                     recv_counts: Sequence[int] | None = None) -> tuple[np.ndarray, list[int]]:
        check_send_counts(send.shape[0], send_counts, self.size)
        sent = np.asarray(send_counts, dtype=np.int64)
        if recv_counts is None:
            received = np.empty(self.size, dtype=np.int64)
            self.comm.Alltoall(sent, received)
        else:
            received = np.asarray(recv_counts, dtype=np.int64)
        send = np.ascontiguousarray(send)
        row_elems = int(np.prod(send.shape[1:], dtype=np.int64))
        out = np.empty((int(received.sum()),) + send.shape[1:], dtype=send.dtype)
        scounts, rcounts = _element_counts(sent, row_elems), _element_counts(received, row_elems)
        self.comm.Alltoallv([send, (scounts, _offsets(scounts))], [out, (rcounts, _offsets(rcounts))])
        return out, [int(c) for c in received]

    def barrier(self) -> None:
        self.comm.Barrier()
