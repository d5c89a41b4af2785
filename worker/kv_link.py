"""Pair links for the KV hand-off between two engine groups' leaders.

A link joins a prefill group's leader (rank 0, sends) and a decode group's
leader (rank 1, receives). It carries a request's prompt K and V as raw
arrays, k then v, while the control messages (a header naming the request,
its tokens and layers, then the commit with the first token) stay on the
PushKV stream. Transports:

- `nccl`: a two-rank NCCL communicator on the leaders' GPUs. Rank 1 makes
  the unique id; the coordinator hands it to rank 0. Arrays are cupy arrays,
  moved as bytes on the link's own stream.
- `tcp`: one TCP connection; rank 1 listens, and its address is the unique
  id. Host arrays. For CPU backends, and to run the protocol in CI.

One transfer at a time per link: the sender holds `Link.lock` from a
piece's header until the receiver acknowledges its bytes (one byte back over
the link once they are in place), so the decode side never has two receives
outstanding on a link and takes each piece's bytes for the header that
announced it, whatever order the requests' streams deliver headers in.
Every wait has a deadline (NCCL's own setup excepted: a rank whose peer
never joins stays in it, on a daemon thread). A link that misses one, or
breaks, raises `LinkBroken` and is closed, and both sides forget it; the
coordinator opens a fresh one at the next hand-off. Each link runs its
transfers on a thread of its own (never the event loop's default pool,
which abandoned waits could fill) and aborts from a thread of its own (an
NCCL abort can block).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np

from shardline.kernels.backend import Backend, gpu_paths_off

TRANSPORTS = ("nccl", "tcp")
POLL_S = 1e-4


class LinkBroken(RuntimeError):
    pass


_FUTURE_TIMEOUTS = (TimeoutError, concurrent.futures.TimeoutError)   # distinct before Python 3.11


def _left(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise LinkBroken(f"{what}: no progress before the deadline")
    return left


class TcpLink:
    """Rank 1 listens on `host` (port chosen by the OS) and accepts once, in the background."""

    def __init__(self, conn_future: Future, listener: socket.socket | None = None):
        self._conn_future, self._listener = conn_future, listener

    @classmethod
    def listen(cls, host: str, accept_timeout_s: float) -> tuple[bytes, TcpLink]:
        listener = socket.create_server((host, 0))
        listener.settimeout(accept_timeout_s)
        future: Future = Future()

        def accept() -> None:
            try:
                conn, _ = listener.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # the one-byte acks go at once
                future.set_result(conn)
            except OSError as err:
                future.set_exception(LinkBroken(f"tcp link: no peer connected ({err})"))
            finally:
                listener.close()

        threading.Thread(target=accept, name="kv-link-accept", daemon=True).start()
        address = f"{host}:{listener.getsockname()[1]}"
        return address.encode(), cls(future, listener)

    @classmethod
    def connect(cls, unique_id: bytes, timeout_s: float) -> TcpLink:
        host, _, port = unique_id.decode().rpartition(":")
        conn = socket.create_connection((host, int(port)), timeout=timeout_s)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        future: Future = Future()
        future.set_result(conn)
        return cls(future)

    def _conn(self, deadline: float) -> socket.socket:
        try:
            return self._conn_future.result(timeout=_left(deadline, "tcp link: connect"))
        except _FUTURE_TIMEOUTS:
            raise LinkBroken("tcp link: the peer never connected") from None

    def send(self, arrays: Sequence[Any], timeout_s: float) -> None:
        """Returns once the receiver acknowledged the bytes."""
        deadline = time.monotonic() + timeout_s
        conn = self._conn(deadline)
        try:
            for array in arrays:
                host = array.get() if hasattr(array, "get") else array   # a GPU export over tcp
                conn.settimeout(_left(deadline, "tcp link: send"))
                conn.sendall(memoryview(np.ascontiguousarray(host)).cast("B"))
            self._read_into(conn, memoryview(bytearray(1)), deadline)
        except OSError as err:
            raise LinkBroken(f"tcp link: send failed ({err})") from None

    def recv(self, shapes: Sequence[tuple[int, ...]], dtype: np.dtype, timeout_s: float) -> list[np.ndarray]:
        deadline = time.monotonic() + timeout_s
        conn = self._conn(deadline)
        arrays = [np.empty(shape, dtype) for shape in shapes]
        try:
            for array in arrays:
                self._read_into(conn, memoryview(array).cast("B"), deadline)
            conn.settimeout(_left(deadline, "tcp link: ack"))
            conn.sendall(b"\x01")   # the acknowledgement
        except OSError as err:
            raise LinkBroken(f"tcp link: recv failed ({err})") from None
        return arrays

    @staticmethod
    def _read_into(conn: socket.socket, view: memoryview, deadline: float) -> None:
        got = 0
        while got < len(view):
            conn.settimeout(_left(deadline, "tcp link: recv"))   # the whole transfer's deadline, not each call's
            n = conn.recv_into(view[got:])
            if n == 0:
                raise LinkBroken("tcp link: the peer closed the connection")
            got += n

    def abort(self) -> None:
        if self._listener is not None:
            self._listener.close()
        if self._conn_future.done() and self._conn_future.exception() is None:
            conn = self._conn_future.result()
            try:
                conn.shutdown(socket.SHUT_RDWR)   # wakes a thread blocked in recv or send (close alone does not)
            except OSError:
                pass
            conn.close()


class NcclLink:
    """A two-rank NCCL communicator on `backend`'s GPU. Construction blocks until both ranks
    joined, then one byte goes each way under `timeout_s`, so the peer connection is set up
    at open time rather than inside the first transfer."""

    def __init__(self, backend: Backend, rank: int, unique_id: bytes, timeout_s: float):
        from cupy.cuda import nccl

        from shardline.parallel.nccl_communicator import unique_id_from_bytes
        self._backend, self._nccl, self.rank = backend, nccl, rank
        self._abort_lock, self._aborted = threading.Lock(), False
        backend.activate()
        self._comm = nccl.NcclCommunicator(2, unique_id_from_bytes(unique_id), rank)
        self._stream = backend.xp.cuda.Stream(non_blocking=True)
        self._ack = backend.xp.zeros(1, dtype=backend.xp.uint8)   # the receiver's acknowledgement
        if rank == 0:   # a byte each way
            self.send([backend.xp.zeros(1, dtype=backend.xp.uint8)], timeout_s)
        else:
            self.recv([(1,)], np.uint8, timeout_s)

    @staticmethod
    def make_unique_id() -> bytes:
        from cupy.cuda import nccl

        from shardline.parallel.nccl_communicator import unique_id_to_bytes
        return unique_id_to_bytes(nccl.get_unique_id())

    def _bytes(self, array: Any) -> Any:
        return self._backend.xp.ascontiguousarray(self._backend.xp.asarray(array)).view(self._backend.xp.uint8)

    def send(self, arrays: Sequence[Any], timeout_s: float) -> None:
        """Returns once the receiver acknowledged the bytes (one byte back, same stream)."""
        deadline = time.monotonic() + timeout_s
        self._backend.activate()
        with self._stream:
            for array in arrays:
                data = self._bytes(array)
                self._comm.send(data.data.ptr, data.size, self._nccl.NCCL_UINT8, 1 - self.rank, self._stream.ptr)
            self._comm.recv(self._ack.data.ptr, 1, self._nccl.NCCL_UINT8, 1 - self.rank, self._stream.ptr)
        self._wait(deadline, "nccl link: send")

    def recv(self, shapes: Sequence[tuple[int, ...]], dtype: np.dtype, timeout_s: float) -> list[Any]:
        """Fresh buffers, filled; the caller must be done with them (its stream synchronised)
        before it drops them: they are allocated on the link's stream, whose next receive may
        reuse their memory at once."""
        deadline = time.monotonic() + timeout_s
        self._backend.activate()
        xp = self._backend.xp
        with self._stream:
            arrays = [xp.empty(shape, dtype) for shape in shapes]
            for array in arrays:
                data = array.view(xp.uint8)
                self._comm.recv(data.data.ptr, data.size, self._nccl.NCCL_UINT8, 1 - self.rank, self._stream.ptr)
            self._comm.send(self._ack.data.ptr, 1, self._nccl.NCCL_UINT8, 1 - self.rank, self._stream.ptr)
        self._wait(deadline, "nccl link: recv")
        return arrays

    def _wait(self, deadline: float, what: str) -> None:
        done = self._stream.record()
        while not done.done:
            if self._aborted:
                break
            if time.monotonic() > deadline:
                self.abort()   # unblocks the stuck send/recv; the link is gone
                break
            time.sleep(POLL_S)
        if self._aborted:   # an aborted communicator completes its work without doing it
            raise LinkBroken(f"{what}: the link was aborted or its peer did not match it before the deadline")

    def abort(self) -> None:
        with self._abort_lock:   # once, whichever thread comes first
            if self._aborted:
                return
            self._aborted = True
            try:
                self._comm.abort()   # never blocks on a dead peer, unlike destroy
            except Exception:  # already broken: nothing left to free
                pass


class Link:
    """One link: its transport endpoint once both ranks joined (`ready`), the lock a sender
    holds from a piece's header to its acknowledgement, and the thread its transfers run on."""

    def __init__(self, link_id: str, transport: str, rank: int):
        self.link_id, self.transport, self.rank = link_id, transport, rank
        self.ready: Future = Future()
        self.lock = asyncio.Lock()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kv-link-{link_id}")
        self.closed = False

    async def run(self, work: Callable[[], Any]) -> Any:
        """`work` on the link's thread; any failure there is LinkBroken."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, work)
        except LinkBroken:
            raise
        except Exception as err:   # NcclError, CUDA errors, OSError, a closed executor
            raise LinkBroken(f"link {self.link_id}: {type(err).__name__}: {err}") from None

    def _endpoint(self, deadline: float) -> Any:
        try:
            return self.ready.result(timeout=_left(deadline, f"link {self.link_id}: join"))
        except _FUTURE_TIMEOUTS:
            raise LinkBroken(f"link {self.link_id}: the peer never joined") from None

    async def send(self, arrays: Sequence[Any], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        await self.run(lambda: self._endpoint(deadline).send(arrays, _left(deadline, "send")))

    async def recv(self, shapes: Sequence[tuple[int, ...]], dtype: np.dtype, timeout_s: float) -> list[Any]:
        deadline = time.monotonic() + timeout_s
        return await self.run(lambda: self._endpoint(deadline).recv(shapes, dtype, _left(deadline, "recv")))

    def close(self) -> None:
        """Aborts the endpoint on a thread of its own (now, or once it joins); never blocks."""
        self.closed = True
        self._thread.shutdown(wait=False)

        def abort(ready: Future) -> None:
            if ready.exception() is None:
                threading.Thread(target=ready.result().abort, name=f"kv-link-abort-{self.link_id}",
                                 daemon=True).start()

        self.ready.add_done_callback(abort)


class KVLinks:
    """A leader's open links by id. `host`: the address a tcp link listens on."""

    def __init__(self, backend: Backend, host: str, timeout_s: float):
        self._backend, self._host, self.timeout_s = backend, host, timeout_s
        self._links: dict[str, Link] = {}

    def transports(self) -> list[str]:
        """nccl on GPUs (unless SHARDLINE_GPU_OFF names nccl_links), and tcp."""
        nccl = self._backend.name == "cuda" and "nccl_links" not in gpu_paths_off()
        return ["nccl", "tcp"] if nccl else ["tcp"]

    async def open(self, link_id: str, transport: str, rank: int, unique_id: bytes) -> bytes:
        """Rank 1 returns the unique id at once and joins in the background; rank 0 returns
        once joined. ValueError names the bad field; LinkBroken when joining fails."""
        if not link_id:
            raise ValueError("link_id must be set")
        if transport not in self.transports():
            raise ValueError(f"transport {transport!r} is not one this leader opens ({', '.join(self.transports())})")
        if rank not in (0, 1):
            raise ValueError(f"rank must be 0 (sender) or 1 (receiver), got {rank}")
        if rank == 0 and not unique_id:
            raise ValueError("unique_id must be set on rank 0")
        self.close(link_id)
        link = self._links[link_id] = Link(link_id, transport, rank)
        try:
            if rank == 1:
                return self._listen(link, transport)
            endpoint = await asyncio.wait_for(link.run(lambda: self._join(transport, unique_id)), self.timeout_s)
            link.ready.set_result(endpoint)
            return unique_id
        except Exception as err:
            self.close(link_id)
            if isinstance(err, LinkBroken):
                raise
            raise LinkBroken(f"link {link_id}: opening failed: {type(err).__name__}: {err}") from None

    def _listen(self, link: Link, transport: str) -> bytes:
        if transport == "tcp":
            unique_id, endpoint = TcpLink.listen(self._host, self.timeout_s)
            link.ready.set_result(endpoint)
            return unique_id
        unique_id = NcclLink.make_unique_id()

        def join() -> None:   # a daemon thread: NCCL's setup has no deadline of its own
            try:
                link.ready.set_result(NcclLink(self._backend, 1, unique_id, self.timeout_s))
            except Exception as err:
                link.ready.set_exception(err)

        threading.Thread(target=join, name=f"kv-link-join-{link.link_id}", daemon=True).start()
        return unique_id

    def _join(self, transport: str, unique_id: bytes) -> Any:
        if transport == "tcp":
            return TcpLink.connect(unique_id, self.timeout_s)
        return NcclLink(self._backend, 0, unique_id, self.timeout_s)

    def get(self, link_id: str) -> Link:
        """KeyError naming the field when no such link is open here."""
        link = self._links.get(link_id)
        if link is None:
            raise KeyError(f"link_id: no KV link {link_id!r} is open here")
        return link

    def close(self, link_id: str) -> bool:
        link = self._links.pop(link_id, None)
        if link is not None:
            link.close()
        return link is not None

    def close_all(self) -> None:
        for link_id in list(self._links):
            self.close(link_id)

    def __len__(self) -> int:
        return len(self._links)
