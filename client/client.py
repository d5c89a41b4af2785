"""Python clients for a shardline cluster: `ShardlineClient` (blocking) and
`AsyncShardlineClient` (asyncio), both over the `shardline.v1.Shardline`
gRPC API.

Results come back as plain frozen dataclasses, never protobuf messages, and
every gRPC failure as a `ShardlineError` carrying the status code's name and
the server's message. Stopping a stream (closing it, breaking out of the
loop and dropping it, leaving its `with` block) cancels the RPC, which the
server sees as a cancelled request.

This module must stay importable anywhere: no cupy, no numpy, no model or
worker code.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, fields
from typing import AsyncIterator, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardline.proto import shardline_pb2 as pb
from shardline.proto import shardline_pb2_grpc as pb_grpc

SERVICE_NAME = "shardline.v1.Shardline"
_FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
                   pb.FINISH_REASON_ABORT: "abort"}
_HEALTH_POLL_S = 0.1


class ShardlineError(Exception):
    """A failed call: `code` is the gRPC status name (`INVALID_ARGUMENT`,
    `UNAVAILABLE`, ...) and `message` the server's own words."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _error(err: grpc.RpcError) -> ShardlineError:
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else None
    return ShardlineError(code.name if code is not None else "UNKNOWN", details or str(err))


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache


@dataclass(frozen=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclass(frozen=True)
class GenerationChunk:
    request_id: str
    text: str                      # new text since the previous chunk
    token_ids: tuple[int, ...]     # new tokens since the previous chunk
    finish_reason: str | None      # "stop" | "length" | "abort" on the last chunk, else None
    usage: Usage | None            # on the last chunk only
    group: str                     # the engine group that served it
    logprobs: tuple[TokenLogprobs, ...] = ()
    stop_reason: str = ""          # the stop string or token that ended it


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    usage: Usage | None
    request_id: str = ""
    group: str = ""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_model_len: int
    num_groups: int


@dataclass(frozen=True)
class GroupStats:
    name: str
    role: str
    healthy: bool
    num_running: int
    num_waiting: int
    kv_usage: float
    prefix_hit_rate: float
    num_kv_blocks: int
    num_free_kv_blocks: int
    num_preemptions: int
    requests_routed: int
    in_flight: int


@dataclass(frozen=True)
class ClusterStats:
    groups: tuple[GroupStats, ...]
    queue_depth: int
    requests_total: int
    router_prefix_hit_rate: float


def _copy_fields(cls, message):
    return cls(**{f.name: getattr(message, f.name) for f in fields(cls)})


def _stats(response: pb.GetStatsResponse) -> ClusterStats:
    return ClusterStats(groups=tuple(_copy_fields(GroupStats, g) for g in response.groups),
                        queue_depth=response.queue_depth, requests_total=response.requests_total,
                        router_prefix_hit_rate=response.router_prefix_hit_rate)


def _chunk(response: pb.GenerateResponse) -> GenerationChunk:
    finish_reason = _FINISH_REASONS.get(response.finish_reason)
    logprobs = tuple(TokenLogprobs(lp.token_id, lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top))
                     for lp in response.logprobs)
    return GenerationChunk(
        request_id=response.request_id, text=response.text, token_ids=tuple(response.token_ids),
        finish_reason=finish_reason, usage=_copy_fields(Usage, response.usage) if finish_reason else None,
        group=response.group, logprobs=logprobs, stop_reason=response.stop_reason)


def collect(chunks: Sequence[GenerationChunk]) -> Completion:
    """One `Completion` from a whole stream's chunks."""
    last = chunks[-1] if chunks else None
    return Completion(text="".join(c.text for c in chunks),
                      token_ids=tuple(t for c in chunks for t in c.token_ids),
                      finish_reason=last.finish_reason if last else None, usage=last.usage if last else None,
                      request_id=last.request_id if last else "", group=last.group if last else "")


def build_request(prompt: str | Sequence[int], *, model: str = "", chat: bool = False,
                  max_tokens: int | None = None, temperature: float | None = None, top_k: int | None = None,
                  top_p: float | None = None, min_p: float | None = None, seed: int | None = None,
                  stop: Sequence[str] = (), ignore_eos: bool = False, logprobs: int = 0, priority: int = 0,
                  request_id: str = "") -> pb.GenerateRequest:
    """A `GenerateRequest`; options left as None take the server's defaults."""
    if isinstance(stop, str):
        stop = (stop,)
    optional = {"max_tokens": max_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                "min_p": min_p, "seed": seed}
    sampling = pb.SamplingOptions(**{k: v for k, v in optional.items() if v is not None},
                                  stop=list(stop), ignore_eos=ignore_eos, logprobs=logprobs)
    request = pb.GenerateRequest(request_id=request_id, model=model, chat=chat, sampling=sampling,
                                 priority=priority)
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.CopyFrom(pb.TokenIds(ids=list(prompt)))  # sets the oneof even when empty
    return request


class _Connection:
    """What both clients share: address, credentials, metadata, timeouts."""

    def __init__(self, address: str, token: str | None, root_certificates: bytes | None, tls: bool,
                 timeout_s: float | None):
        self.address = address
        self.timeout_s = timeout_s
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.credentials = (grpc.ssl_channel_credentials(root_certificates)
                            if tls or root_certificates is not None else None)

    def timeout(self, timeout_s: float | None) -> float | None:
        return self.timeout_s if timeout_s is None else timeout_s


def _health_status(check, metadata, deadline: float) -> health_pb2.HealthCheckResponse | None:
    """The server's health status: the Shardline service's if the server
    tracks it, else the whole server's. None when unreachable."""
    for service in (SERVICE_NAME, ""):
        try:
            timeout_s = max(min(deadline - time.monotonic(), 1.0), 0.01)
            return check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                return None
    return None


def _not_ready(address: str, timeout_s: float) -> ShardlineError:
    return ShardlineError("DEADLINE_EXCEEDED", f"{address} did not report SERVING within {timeout_s:g} s")


class GenerationStream:
    """The chunks of one `generate` call; iterate it. `close()` (or leaving
    a `with` block, or dropping it) cancels the request on the server."""

    def __init__(self, call):
        self._call = call

    def __iter__(self) -> Iterator[GenerationChunk]:
        return self

    def __next__(self) -> GenerationChunk:
        try:
            return _chunk(next(self._call))
        except grpc.RpcError as err:
            raise _error(err) from None

    def close(self) -> None:
        self._call.cancel()

    def __enter__(self) -> "GenerationStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # a finalizer: the channel or loop may be gone already
            self._call.cancel()


class ShardlineClient:
    """Blocking client. `address` is "host:port"; `token` is sent as
    `authorization: Bearer <token>`; `root_certificates` (PEM bytes) or
    `tls=True` (system roots) switch the channel to TLS; `timeout_s` is the
    default deadline of every call (None: no deadline)."""

    def __init__(self, address: str, *, token: str | None = None, root_certificates: bytes | None = None,
                 tls: bool = False, timeout_s: float | None = None):
        self._conn = _Connection(address, token, root_certificates, tls, timeout_s)
        creds = self._conn.credentials
        self._channel = (grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address))
        self._stub = pb_grpc.ShardlineStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _unary(self, method, request, timeout_s: float | None = None):
        try:
            return method(request, timeout=self._conn.timeout(timeout_s), metadata=self._conn.metadata)
        except grpc.RpcError as err:
            raise _error(err) from None

    def generate(self, prompt: str | Sequence[int], *, timeout_s: float | None = None,
                 **options) -> GenerationStream:
        """Streams `GenerationChunk`s. Options: model, chat, max_tokens,
        temperature, top_k, top_p, min_p, seed, stop, ignore_eos, logprobs,
        priority, request_id (see `build_request`)."""
        call = self._stub.Generate(build_request(prompt, **options), timeout=self._conn.timeout(timeout_s),
                                   metadata=self._conn.metadata)
        return GenerationStream(call)

    def complete(self, prompt: str | Sequence[int], *, timeout_s: float | None = None, **options) -> Completion:
        with self.generate(prompt, timeout_s=timeout_s, **options) as stream:
            return collect(list(stream))

    def abort(self, request_id: str) -> bool:
        """True if the server knew the request."""
        return self._unary(self._stub.Abort, pb.AbortRequest(request_id=request_id)).found

    def list_models(self) -> list[ModelInfo]:
        response = self._unary(self._stub.ListModels, pb.ListModelsRequest())
        return [_copy_fields(ModelInfo, m) for m in response.models]

    def stats(self) -> ClusterStats:
        return _stats(self._unary(self._stub.GetStats, pb.GetStatsRequest()))

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Polls the gRPC health service until it reports SERVING."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            response = _health_status(self._health.Check, self._conn.metadata, deadline)
            if response is not None and response.status == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(_HEALTH_POLL_S)
        raise _not_ready(self._conn.address, timeout_s)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "ShardlineClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncGenerationStream:
    """The async counterpart of `GenerationStream`: `async for` over it;
    `aclose()`/`close()` or leaving `async with` cancels the request."""

    def __init__(self, call):
        self._call = call
        self._responses = call.__aiter__()

    def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        return self

    async def __anext__(self) -> GenerationChunk:
        try:
            return _chunk(await self._responses.__anext__())
        except grpc.RpcError as err:
            raise _error(err) from None

    def close(self) -> None:
        self._call.cancel()

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> "AsyncGenerationStream":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # a finalizer: the channel or loop may be gone already
            self._call.cancel()


class AsyncShardlineClient:
    """The asyncio client: the same methods as `ShardlineClient`, as
    coroutines (and `generate` as an async iterator). Create it inside the
    event loop that will use it."""

    def __init__(self, address: str, *, token: str | None = None, root_certificates: bytes | None = None,
                 tls: bool = False, timeout_s: float | None = None):
        self._conn = _Connection(address, token, root_certificates, tls, timeout_s)
        creds = self._conn.credentials
        self._channel = (grpc.aio.secure_channel(address, creds) if creds else grpc.aio.insecure_channel(address))
        self._stub = pb_grpc.ShardlineStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def _unary(self, method, request, timeout_s: float | None = None):
        try:
            return await method(request, timeout=self._conn.timeout(timeout_s), metadata=self._conn.metadata)
        except grpc.RpcError as err:
            raise _error(err) from None

    def generate(self, prompt: str | Sequence[int], *, timeout_s: float | None = None,
                 **options) -> AsyncGenerationStream:
        call = self._stub.Generate(build_request(prompt, **options), timeout=self._conn.timeout(timeout_s),
                                   metadata=self._conn.metadata)
        return AsyncGenerationStream(call)

    async def complete(self, prompt: str | Sequence[int], *, timeout_s: float | None = None,
                       **options) -> Completion:
        async with self.generate(prompt, timeout_s=timeout_s, **options) as stream:
            return collect([chunk async for chunk in stream])

    async def abort(self, request_id: str) -> bool:
        return (await self._unary(self._stub.Abort, pb.AbortRequest(request_id=request_id))).found

    async def list_models(self) -> list[ModelInfo]:
        response = await self._unary(self._stub.ListModels, pb.ListModelsRequest())
        return [_copy_fields(ModelInfo, m) for m in response.models]

    async def stats(self) -> ClusterStats:
        return _stats(await self._unary(self._stub.GetStats, pb.GetStatsRequest()))

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            response = await _async_health_status(self._health.Check, self._conn.metadata, deadline)
            if response is not None and response.status == health_pb2.HealthCheckResponse.SERVING:
                return
            await asyncio.sleep(_HEALTH_POLL_S)
        raise _not_ready(self._conn.address, timeout_s)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncShardlineClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def _async_health_status(check, metadata, deadline: float):
    for service in (SERVICE_NAME, ""):
        try:
            timeout_s = max(min(deadline - time.monotonic(), 1.0), 0.01)
            return await check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s,
                               metadata=metadata)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                return None
    return None
