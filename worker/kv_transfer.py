"""Moving one request's prompt KV from a prefill group to a decode group.

The exporting leader holds the prompt's K and V for every layer and every
KV head (its tensor-parallel ranks' head slices gathered, `join_heads`) as
host arrays in the storage dtype; `kv_chunks` cuts them into PushKV
messages layer by layer (at most `max_chunk_bytes` each), the last one
committing with the first token. The decode leader's `KVAssembler` puts
the chunks back together and checks they cover exactly what it reserved;
its ranks take their own head slices (parallel/sharding.kv_head_range), so
prefill and decode groups may differ in tp. `KVPusher` keeps one channel per decode group.

No GPU code and no engine state here: the engine reads and writes the
cache (ModelRunner.read_kv / write_kv), the services drive the RPCs.
"""

from __future__ import annotations

import time
from typing import AsyncIterator, Iterator

import grpc
import numpy as np

from shardline.proto import shardline_pb2, worker_pb2, worker_pb2_grpc
from shardline.worker.kv_handoff import KVExport

MAX_CHUNK_BYTES = 1 << 20


def kv_chunks(request_id: str, export: KVExport, first_token_id: int,
              first_logprobs: shardline_pb2.TokenLogprobs | None,
              max_chunk_bytes: int = MAX_CHUNK_BYTES) -> Iterator[worker_pb2.KVChunk]:
    num_layers, num_tokens = export.k.shape[:2]
    per_token = 2 * export.k[0, 0].nbytes
    tokens_per_chunk = max(1, max_chunk_bytes // max(per_token, 1))
    dtype = str(export.k.dtype)
    for layer in range(num_layers):
        for start in range(0, num_tokens, tokens_per_chunk):
            stop = min(start + tokens_per_chunk, num_tokens)
            yield worker_pb2.KVChunk(
                request_id=request_id, start_token=export.start_token + start, num_tokens=stop - start,
                layer_start=layer, num_layers=1, dtype=dtype, k=export.k[layer:layer + 1, start:stop].tobytes(),
                v=export.v[layer:layer + 1, start:stop].tobytes())
    commit = worker_pb2.KVChunk(request_id=request_id, commit=True, first_token_id=first_token_id)
    if first_logprobs is not None:
        commit.first_logprobs.CopyFrom(first_logprobs)
        commit.has_logprobs = True
    yield commit


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

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


async def _aiter(items: Iterator) -> AsyncIterator:
    for item in items:
        yield item
