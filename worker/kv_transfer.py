"""Moving one request's prompt KV from a prefill group to a decode group.

The exporting leader holds the prompt's K and V for every layer and every
KV head (its tensor-parallel ranks' head slices gathered, `join_heads`) as
host arrays in the storage dtype; `kv_chunks` cuts them into PushKV
messages layer by layer (at most `max_chunk_bytes` each), the last one
committing with the first token. The decode leader's `KVAssembler` puts
the chunks back together and checks they cover exactly what it reserved;
its ranks take their own head slices (parallel/sharding.kv_head_range), so
prefill and decode groups may differ in tp. `KVPusher` keeps one channel per decode group.

Over a pair link (kv_link.py) the same stream carries only a header, whose
`link_id` says the bytes follow on the link, and the commit; `push_over_link`
and `receive_over_link` are the two ends. Any failure closes the link on
the side that saw it (the coordinator closes the other end).

No GPU code and no engine state here: the engine reads and writes the
cache (ModelRunner.read_kv / write_kv), the services drive the RPCs.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Iterator

import grpc
import numpy as np

from shardline.proto import shardline_pb2, worker_pb2, worker_pb2_grpc
from shardline.worker.kv_handoff import KVExport
from shardline.worker.kv_link import KVLinks, Link, LinkBroken

MAX_CHUNK_BYTES = 1 << 20


def _host(array) -> np.ndarray:
    return array.get() if hasattr(array, "get") else array   # a cupy export leaves the GPU here


def commit_chunk(request_id: str, first_token_id: int,
                 first_logprobs: shardline_pb2.TokenLogprobs | None) -> worker_pb2.KVChunk:
    commit = worker_pb2.KVChunk(request_id=request_id, commit=True, first_token_id=first_token_id)
    if first_logprobs is not None:
        commit.first_logprobs.CopyFrom(first_logprobs)
        commit.has_logprobs = True
    return commit


def kv_chunks(request_id: str, export: KVExport, first_token_id: int,
              first_logprobs: shardline_pb2.TokenLogprobs | None,
              max_chunk_bytes: int = MAX_CHUNK_BYTES) -> Iterator[worker_pb2.KVChunk]:
    k, v = _host(export.k), _host(export.v)
    num_layers, num_tokens = k.shape[:2]
    per_token = 2 * k[0, 0].nbytes
    tokens_per_chunk = max(1, max_chunk_bytes // max(per_token, 1))
    for layer in range(num_layers):
        for start in range(0, num_tokens, tokens_per_chunk):
            stop = min(start + tokens_per_chunk, num_tokens)
            yield worker_pb2.KVChunk(
                request_id=request_id, start_token=export.start_token + start, num_tokens=stop - start,
                layer_start=layer, num_layers=1, dtype=str(k.dtype), k=k[layer:layer + 1, start:stop].tobytes(),
                v=v[layer:layer + 1, start:stop].tobytes())
    yield commit_chunk(request_id, first_token_id, first_logprobs)


def link_header(request_id: str, export: KVExport, link_id: str) -> worker_pb2.KVChunk:
    num_layers, num_tokens = export.k.shape[:2]
    return worker_pb2.KVChunk(request_id=request_id, start_token=export.start_token, num_tokens=num_tokens,
                              layer_start=0, num_layers=num_layers, dtype=np.dtype(export.k.dtype).name,
                              link_id=link_id)


async def receive_over_link(links: KVLinks, header: worker_pb2.KVChunk, reserved: tuple[int, int] | None,
                            kv_shape: tuple[int, int, int], kv_dtype: str, max_model_len: int):
    """K and V of a header's request, received over its link into arrays of
    [num_layers, num_tokens, heads, head_dim]. KeyError / ValueError name the field.

    A well-formed header whose request holds no reservation here (aborted,
    expired) is drained into scratch first, keeping the link in step for the
    next transfer. A header that does not fit the model closes the link (its
    sender is sending already), as does any failure while receiving."""
    link = links.get(header.link_id)
    num_layers, num_kv_heads, head_dim = kv_shape
    try:
        if header.layer_start != 0 or header.num_layers != num_layers:
            raise ValueError(f"num_layers: the header announces layers [{header.layer_start}, "
                             f"{header.layer_start + header.num_layers}), the model has {num_layers}")
        if header.dtype != kv_dtype:
            raise ValueError(f"dtype: the header has {header.dtype!r}, the decode group stores {kv_dtype!r}")
        if header.num_tokens < 1 or header.start_token + header.num_tokens > max_model_len:
            raise ValueError(f"num_tokens: tokens [{header.start_token}, {header.start_token + header.num_tokens})"
                             f" do not fit max_model_len {max_model_len}")
        shape = (num_layers, header.num_tokens, num_kv_heads, head_dim)
        k, v = await asyncio.to_thread(link.recv, [shape, shape], np.dtype(kv_dtype), links.timeout_s)
    except BaseException:   # cancelled too: closing unblocks the receiving thread
        links.close(header.link_id)
        raise
    if reserved is None:
        raise KeyError(f"request_id: {header.request_id!r} holds no KV reservation here (aborted or expired)")
    start, stop = reserved
    if header.start_token != start or header.num_tokens != stop - start:
        raise ValueError(f"start_token: the reservation expects prompt tokens [{start}, {stop}), the header "
                         f"announces [{header.start_token}, {header.start_token + header.num_tokens})")
    return k, v


class KVAssembler:
    """Collects one request's chunks into [num_layers, num_tokens, heads, head_dim]
    arrays covering prompt tokens [start_token, stop_token). ValueError names
    the field of a chunk that does not fit."""

    def __init__(self, start_token: int, stop_token: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: np.dtype):
        shape = (num_layers, stop_token - start_token, num_kv_heads, head_dim)
        self.start_token, self.stop_token, self.dtype = start_token, stop_token, np.dtype(dtype)
        self.k, self.v = np.empty(shape, self.dtype), np.empty(shape, self.dtype)
        self._filled = np.zeros(shape[:2], dtype=bool)
        self.num_bytes = 0

    def add(self, chunk: worker_pb2.KVChunk) -> None:
        if chunk.dtype != self.dtype.name:
            raise ValueError(f"dtype: chunk has {chunk.dtype!r}, the decode group stores {self.dtype.name!r}")
        start, stop = chunk.start_token, chunk.start_token + chunk.num_tokens
        if start < self.start_token or stop > self.stop_token:
            raise ValueError(f"start_token: tokens [{start}, {stop}) are outside the reserved "
                             f"[{self.start_token}, {self.stop_token})")
        layers = slice(chunk.layer_start, chunk.layer_start + chunk.num_layers)
        if layers.stop > self.k.shape[0]:
            raise ValueError(f"layer_start: layers [{layers.start}, {layers.stop}) beyond {self.k.shape[0]}")
        shape = (chunk.num_layers, chunk.num_tokens, *self.k.shape[2:])
        expected = int(np.prod(shape)) * self.dtype.itemsize
        if len(chunk.k) != expected or len(chunk.v) != expected:
            raise ValueError(f"k: {len(chunk.k)} bytes, expected {expected} for shape {shape}")
        rows = slice(start - self.start_token, stop - self.start_token)
        self.k[layers, rows] = np.frombuffer(chunk.k, self.dtype).reshape(shape)
        self.v[layers, rows] = np.frombuffer(chunk.v, self.dtype).reshape(shape)
        self._filled[layers, rows] = True
        self.num_bytes += 2 * expected

    def check_complete(self) -> None:
        if not self._filled.all():
            layer, row = np.argwhere(~self._filled)[0]
            raise ValueError(f"commit: KV of token {self.start_token + int(row)} of layer {int(layer)} never arrived")


class KVPusher:
    """Pushes exports to decode groups, one channel per address."""

    def __init__(self, max_message_bytes: int):
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._background: set[asyncio.Task] = set()   # link transfers whose caller went away
        self._options = [("grpc.max_send_message_length", max_message_bytes),
                         ("grpc.max_receive_message_length", max_message_bytes)]

    async def push(self, address: str, chunks: Iterator[worker_pb2.KVChunk]) -> tuple[int, float]:
        """(bytes the decode group took, seconds until it acknowledged the commit)."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address, options=self._options)
        started_s = time.perf_counter()
        response = await worker_pb2_grpc.WorkerStub(channel).PushKV(_aiter(chunks))
        return response.num_bytes, time.perf_counter() - started_s

    async def push_over_link(self, address: str, links: KVLinks, link: Link, header: worker_pb2.KVChunk,
                             arrays: list, commit: worker_pb2.KVChunk) -> tuple[int, float]:
        """The header on the PushKV stream, the arrays over `link`, then the commit.

        Once this holds the link, cancelling it no longer stops the transfer (the
        receiver is already waiting for the bytes; stopping halfway would break the
        link): it finishes in the background. LinkBroken: the link failed and is
        closed here. grpc.aio.AioRpcError: the decode group refused the transfer
        after taking the bytes (the link is still good)."""
        holding = asyncio.Event()

        async def transfer() -> tuple[int, float]:
            async with link.lock:
                holding.set()
                started_s = time.perf_counter()
                send = asyncio.ensure_future(asyncio.to_thread(link.send, arrays, links.timeout_s))

                async def messages():
                    yield header
                    await asyncio.shield(send)   # the bytes are across before the commit goes
                    yield commit

                try:
                    num_bytes, _ = await self.push(address, messages())
                except BaseException:
                    if not send.done():
                        links.close(link.link_id)   # the receiver gave up: unblock our send
                    await asyncio.gather(send, return_exceptions=True)
                    if send.cancelled() or send.exception() is not None or not links.has(link.link_id):
                        links.close(link.link_id)
                        raise LinkBroken(f"link {link.link_id}: the transfer did not complete") from None
                    raise
                return num_bytes, time.perf_counter() - started_s

        task = asyncio.ensure_future(transfer())
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not holding.is_set():
                task.cancel()          # still waiting for the link: nothing sent
            else:
                self._background.add(task)
                task.add_done_callback(lambda t: (self._background.discard(t), t.cancelled() or t.exception()))
            raise

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


async def _aiter(items: Iterator | AsyncIterator) -> AsyncIterator:
    if hasattr(items, "__aiter__"):
        async for item in items:
            yield item
        return
    for item in items:
        yield item
