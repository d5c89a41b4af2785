"""The messages that move a request's prompt KV from a prefill group to a
decode group, and their reassembly on the decode side.

The exporting leader holds the prompt's K and V for every layer and every
KV head (its tensor-parallel ranks' head slices gathered, `join_heads`) in
the storage dtype, in pieces: one per engine step that computed part of the
prompt (kv_handoff.py). Over the PushKV stream alone, `piece_chunks` cuts a
piece into messages layer by layer (at most `max_chunk_bytes` each) and
`commit_chunk` ends the stream with the first token; the decode leader's
`KVAssembler` puts the chunks back together and checks they cover exactly
what it reserved. Over a pair link (kv_link.py) the stream carries a header
per piece (`link_header`, whose `link_id` says the bytes follow on the
link) and the commit; `receive_over_link` takes one piece's bytes and
`PieceAssembly` joins the pieces. The decode group's ranks take their own
head slices (parallel/sharding.kv_head_range), so prefill and decode
groups may differ in tp. kv_push.py sends.

No engine state here: the engine reads and writes the cache
(ModelRunner.read_kv / write_kv), the services drive the RPCs.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from shardline.proto import shardline_pb2, worker_pb2
from shardline.worker.kv_handoff import KVExport
from shardline.worker.kv_link import KVLinks

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


def piece_chunks(request_id: str, export: KVExport,
                 max_chunk_bytes: int = MAX_CHUNK_BYTES) -> Iterator[worker_pb2.KVChunk]:
    """One piece's bytes as PushKV messages, layer by layer."""
    k, v = _host(export.k), _host(export.v)
    num_layers, num_tokens = k.shape[:2]
    per_token = 2 * k[0, 0].nbytes if num_tokens else 1
    tokens_per_chunk = max(1, max_chunk_bytes // max(per_token, 1))
    for layer in range(num_layers):
        for start in range(0, num_tokens, tokens_per_chunk):
            stop = min(start + tokens_per_chunk, num_tokens)
            yield worker_pb2.KVChunk(
                request_id=request_id, start_token=export.start_token + start, num_tokens=stop - start,
                layer_start=layer, num_layers=1, dtype=str(k.dtype), k=k[layer:layer + 1, start:stop].tobytes(),
                v=v[layer:layer + 1, start:stop].tobytes())


def kv_chunks(request_id: str, export: KVExport, first_token_id: int,
              first_logprobs: shardline_pb2.TokenLogprobs | None,
              max_chunk_bytes: int = MAX_CHUNK_BYTES) -> Iterator[worker_pb2.KVChunk]:
    """A whole export's messages, the commit last."""
    yield from piece_chunks(request_id, export, max_chunk_bytes)
    yield commit_chunk(request_id, first_token_id, first_logprobs)


def link_header(request_id: str, export: KVExport, link_id: str) -> worker_pb2.KVChunk:
    num_layers, num_tokens = export.k.shape[:2]
    return worker_pb2.KVChunk(request_id=request_id, start_token=export.start_token, num_tokens=num_tokens,
                              layer_start=0, num_layers=num_layers, dtype=np.dtype(export.k.dtype).name,
                              link_id=link_id)


async def receive_over_link(links: KVLinks, header: worker_pb2.KVChunk, kv_shape: tuple[int, int, int],
                            kv_dtype: str, max_model_len: int):
    """K and V of the piece a header announces, received over its link into arrays of
    [num_layers, num_tokens, heads, head_dim]. KeyError / ValueError name the field. A
    header that does not fit the model closes the link (its sender is sending already),
    as does any failure while receiving."""
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
        return await link.recv([shape, shape], np.dtype(kv_dtype), links.timeout_s)
    except BaseException:   # cancelled too: closing unblocks the receiving thread
        links.close(header.link_id)
        raise


class PieceAssembly:
    """A link transfer's pieces, in order, covering the reserved prompt tokens
    [start, stop). With no reservation (`reserved` None) the pieces are drained:
    received, so the link stays in step, and dropped."""

    def __init__(self, reserved: tuple[int, int] | None):
        self.reserved = reserved
        self._k: list = []
        self._v: list = []
        self.num_bytes = 0

    def add(self, start_token: int, k, v) -> None:
        self.num_bytes += k.nbytes + v.nbytes
        if self.reserved is None:
            return
        start, stop = self.reserved
        expected = start + sum(piece.shape[1] for piece in self._k)
        if start_token != expected or start_token + k.shape[1] > stop:
            raise ValueError(f"start_token: a piece of tokens [{start_token}, {start_token + k.shape[1]}) where "
                             f"the reservation [{start}, {stop}) expects the next to start at {expected}")
        self._k.append(k)
        self._v.append(v)

    def result(self) -> tuple[int, list, list]:
        """(start token, k pieces, v pieces) covering the reservation; ValueError when some
        never arrived. The pieces stay separate: the engine writes each where it belongs and
        is done with them before they are dropped (kv_link.NcclLink.recv says why)."""
        start, stop = self.reserved
        received = sum(piece.shape[1] for piece in self._k)
        if start + received != stop:
            raise ValueError(f"commit: the KV of prompt tokens [{start + received}, {stop}) never arrived")
        return start, self._k, self._v


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
