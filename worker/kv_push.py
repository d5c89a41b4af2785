"""The prefill leader's side of a hand-off: pushing one request's prompt KV
to the decode group that reserved blocks for it, piece by piece while the
engine computes the rest of the prompt, then the commit with the first token.

`KVPusher` keeps one gRPC channel per decode group and opens a `PushSession`
per request: a PushKV call fed from a queue. Over the stream alone, a piece
is its chunks (kv_transfer.piece_chunks). Over a pair link, a piece is a
header on the stream and its bytes on the link; the session holds the
link's lock from the header until the bytes are across, so pieces of
different requests never interleave on the link and the decode side,
which sees a header only when the link is free, posts its receives in the
order the sends come. Once a piece holds the link, cancelling the caller
no longer stops it (the receiver is already waiting for those bytes): it
finishes in the background. A failure on the link closes it here
(LinkBroken); the coordinator then closes the other end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

import grpc

from shardline.proto import worker_pb2, worker_pb2_grpc
from shardline.worker.kv_handoff import KVExport
from shardline.worker.kv_link import KVLinks, Link, LinkBroken
from shardline.worker.kv_transfer import link_header, piece_chunks

log = logging.getLogger(__name__)
_END = None


class PushSession:
    def __init__(self, stub: worker_pb2_grpc.WorkerStub, request_id: str, links: KVLinks, link: Link | None,
                 background: set[asyncio.Task], timeout_s: float | None):
        self.request_id, self._links, self._link, self._background = request_id, links, link, background
        self._queue: asyncio.Queue = asyncio.Queue()
        self._call = stub.PushKV(self._messages(), timeout=timeout_s)
        self._response = asyncio.ensure_future(self._answer())
        self.busy_s = 0.0   # seconds pieces held the link, and the commit waited for its answer

    async def _answer(self) -> worker_pb2.PushKVResponse:
        return await self._call

    async def _messages(self) -> AsyncIterator[worker_pb2.KVChunk]:
        while (message := await self._queue.get()) is not _END:
            yield message

    async def send(self, piece: KVExport) -> None:
        """Queues (over the stream) or transfers (over the link) one piece. LinkBroken;
        grpc.aio.AioRpcError when the decode group ended the call."""
        if self._response.done():
            await self._response   # raises the decode group's error
            raise RuntimeError(f"the decode group answered for {self.request_id!r} before its commit")
        if self._link is None:   # copied off the GPU on a thread, not on the event loop
            for chunk in await asyncio.to_thread(lambda: list(piece_chunks(self.request_id, piece))):
                self._queue.put_nowait(chunk)
            return
        holding = asyncio.Event()
        task = asyncio.ensure_future(self._send_over_link(piece, holding))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if holding.is_set():   # bytes under way: let them land, then the link is free again
                self._background.add(task)
                task.add_done_callback(self._settled)
            else:
                task.cancel()
            raise

    async def _send_over_link(self, piece: KVExport, holding: asyncio.Event) -> None:
        link = self._link
        try:
            await asyncio.wait_for(link.lock.acquire(), self._links.timeout_s)
        except asyncio.TimeoutError:
            raise LinkBroken(f"link {link.link_id}: busy past the deadline") from None
        try:
            holding.set()
            if self._response.done():   # the call is over: leave the link alone
                await self._response
                raise RuntimeError(f"the decode group answered for {self.request_id!r} before its commit")
            started_s = time.perf_counter()
            self._queue.put_nowait(link_header(self.request_id, piece, link.link_id))
            send = asyncio.ensure_future(link.send([piece.k, piece.v], self._links.timeout_s))
            await asyncio.wait({send, self._response}, return_when=asyncio.FIRST_COMPLETED)
            if not send.done():   # the decode group ended the call without taking the bytes
                self._links.close(link.link_id)   # unblocks our send
            await asyncio.gather(send, return_exceptions=True)
            if send.cancelled() or send.exception() is not None or link.closed:
                self._links.close(link.link_id)
                raise LinkBroken(f"link {link.link_id}: a piece of {self.request_id!r} did not get across")
            self.busy_s += time.perf_counter() - started_s
        finally:
            link.lock.release()

    def _settled(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("a piece of %s finished in the background: %s", self.request_id, task.exception())

    async def commit(self, commit: worker_pb2.KVChunk) -> tuple[int, float]:
        """(bytes the decode group took, seconds the transfer added: pieces holding the link,
        then the commit until the decode group answered; time spent computing the prompt
        between pieces does not count)."""
        started_s = time.perf_counter()
        self._queue.put_nowait(commit)
        self._queue.put_nowait(_END)
        response = await self._response
        return response.num_bytes, self.busy_s + time.perf_counter() - started_s

    def abort(self) -> None:
        """Ends the stream without a commit: the decode group drops what it received and
        answers INVALID_ARGUMENT. The call is not cancelled: a piece still under way (in the
        background) must land and be acknowledged first, or the link would break."""
        self._queue.put_nowait(_END)
        self._response.add_done_callback(lambda answer: answer.cancelled() or answer.exception())


class KVPusher:
    """One channel per decode group address; the sessions' pieces left running in the background."""

    def __init__(self, max_message_bytes: int):
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._options = [("grpc.max_send_message_length", max_message_bytes),
                         ("grpc.max_receive_message_length", max_message_bytes)]
        self._background: set[asyncio.Task] = set()

    def session(self, address: str, request_id: str, links: KVLinks, link: Link | None = None,
                timeout_s: float | None = None) -> PushSession:
        """`timeout_s`: the whole PushKV call's deadline (the prefill's own, plus a link timeout)."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address, options=self._options)
        return PushSession(worker_pb2_grpc.WorkerStub(channel), request_id, links, link, self._background,
                           timeout_s)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
