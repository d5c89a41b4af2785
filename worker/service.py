"""The gRPC `shardline.worker.v1.Worker` servicer of an engine group's leader.

Validates requests at this boundary (INVALID_ARGUMENT naming the field),
turns each engine output into one streamed response, aborts a request in the
engine when its caller cancels or its deadline passes, and serves status and
KV events. `start_worker_server` puts it on a grpc.aio server together with
the standard health service.

It must not touch the LLMEngine directly (only through EngineLoop, which
owns the engine thread) nor know how the process starts (rank_main does).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shardline.proto import shardline_pb2, worker_pb2, worker_pb2_grpc
from shardline.worker.engine import EngineOutput
from shardline.worker.engine_loop import EngineLoop
from shardline.worker.engine_streams import (EngineFailed, EngineLimits, EngineStatus, EngineStopped, KVEventBatch,
                                             RequestIdInUse, RequestStream, SubscriberLagged)
from shardline.worker.kv_link import KVLinks, LinkBroken
from shardline.worker.kv_push import KVPusher
from shardline.worker.kv_transfer import KVAssembler, PieceAssembly, commit_chunk, receive_over_link
from shardline.worker.proto_convert import (finish_reason_to_proto, logprobs_from_proto, logprobs_to_proto,
                                            sampling_params_from_proto)
from shardline.worker.sampling_params import SamplingParams
from shardline.worker.scheduler import RESERVATION_EXPIRED

log = logging.getLogger(__name__)

WORKER_SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
_KV_KINDS = {"stored": worker_pb2.KVEvent.KIND_STORED, "removed": worker_pb2.KVEvent.KIND_REMOVED}


@dataclass(frozen=True)
class WorkerIdentity:
    group: str
    model: str                  # the served model name
    default_max_tokens: int     # when a request leaves sampling.max_tokens unset
    max_tokens_limit: int       # the most a request may ask for


def validate_generate(request: worker_pb2.WorkerGenerateRequest, limits: EngineLimits,
                      identity: WorkerIdentity) -> SamplingParams:
    """The request's sampling params; ValueError whose message starts with the bad field."""
    if not request.request_id:
        raise ValueError("request_id must be a non-empty string")
    params = sampling_params_from_proto(request.sampling, identity.default_max_tokens, identity.max_tokens_limit)
    num_prompt_tokens, num_output_tokens = len(request.prompt_token_ids), len(request.output_token_ids)
    if not num_prompt_tokens:
        raise ValueError("prompt_token_ids must hold at least one token")
    for name in ("prompt_token_ids", "output_token_ids"):
        ids = getattr(request, name)
        if ids and max(ids) >= limits.vocab_size:
            index = next(i for i, t in enumerate(ids) if t >= limits.vocab_size)
            raise ValueError(f"{name}[{index}] = {ids[index]} is out of range: token ids must be below "
                             f"the vocabulary size {limits.vocab_size}")
    if num_output_tokens >= params.max_tokens:
        raise ValueError(f"output_token_ids holds {num_output_tokens} tokens but sampling.max_tokens is "
                         f"{params.max_tokens}: nothing is left to generate")
    total = num_prompt_tokens + params.max_tokens
    if total > limits.max_model_len:
        raise ValueError(f"sampling.max_tokens: prompt_token_ids ({num_prompt_tokens} tokens) + max_tokens "
                         f"({params.max_tokens}) = {total} exceeds max_model_len ({limits.max_model_len})")
    return params


def response_from_output(output: EngineOutput) -> worker_pb2.WorkerGenerateResponse:
    reason = finish_reason_to_proto(output.finish_reason) if output.finished \
        else shardline_pb2.FINISH_REASON_UNSPECIFIED
    return worker_pb2.WorkerGenerateResponse(
        token_ids=output.new_token_ids, text=output.text,
        logprobs=[logprobs_to_proto(t, entry) for t, entry in zip(output.new_token_ids, output.logprobs)],
        finish_reason=reason, num_prompt_tokens=output.num_prompt_tokens,
        num_cached_tokens=output.num_cached_tokens)


def status_to_proto(status: EngineStatus, limits: EngineLimits, identity: WorkerIdentity) -> worker_pb2.WorkerStatus:
    return worker_pb2.WorkerStatus(
        group=identity.group, model=identity.model, max_model_len=limits.max_model_len,
        block_size_tokens=limits.block_size_tokens, num_running=status.num_running,
        num_waiting=status.num_waiting, num_kv_blocks=status.num_kv_blocks,
        num_free_kv_blocks=status.num_free_kv_blocks, kv_usage=status.kv_usage,
        prefix_hit_rate=status.prefix_hit_rate, num_preemptions=status.num_preemptions,
        num_reserved=status.num_reserved)


def kv_batch_to_proto(batch: KVEventBatch) -> worker_pb2.KVEventBatch:
    return worker_pb2.KVEventBatch(
        sequence_number=batch.sequence_number, snapshot=batch.is_snapshot,
        snapshot_hashes=sorted(batch.snapshot_hashes or ()),
        events=[worker_pb2.KVEvent(kind=_KV_KINDS[e.kind], block_hashes=e.block_hashes) for e in batch.events])


def validate_prefill(request: worker_pb2.PrefillRequest, limits: EngineLimits,
                     identity: WorkerIdentity) -> SamplingParams:
    """A one-token version of the request's params; ValueError naming the bad field."""
    params = validate_generate(worker_pb2.WorkerGenerateRequest(
        request_id=request.request_id, prompt_token_ids=request.prompt_token_ids, sampling=request.sampling),
        limits, identity)
    if not request.decode_address or not request.decode_request_id:
        raise ValueError("decode_address and decode_request_id must be set")
    if request.num_skip_tokens >= len(request.prompt_token_ids):
        raise ValueError(f"num_skip_tokens ({request.num_skip_tokens}) must be below the prompt length "
                         f"({len(request.prompt_token_ids)})")
    return dataclasses.replace(params, max_tokens=1)


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine_loop: EngineLoop, identity: WorkerIdentity, max_message_bytes: int = 4 << 20,
                 link_host: str = "127.0.0.1", link_timeout_s: float = 30.0):
        self._engine_loop = engine_loop
        self._identity = identity
        self._reservations: dict[str, tuple[int, int]] = {}   # request id -> (first pushed token, prompt length)
        self._pusher = KVPusher(max_message_bytes)
        self._links = KVLinks(engine_loop.backend, link_host, link_timeout_s)

    def status(self) -> worker_pb2.WorkerStatus:
        status = status_to_proto(self._engine_loop.status(), self._engine_loop.limits, self._identity)
        status.kv_transports.extend(self._links.transports())
        return status

    async def close(self) -> None:
        self._links.close_all()
        await self._pusher.close()

    async def _start(self, context: grpc.aio.ServicerContext, request, validate, **options) -> RequestStream:
        """The engine's stream of a validated new request; a refused one aborts the call
        with its status (INVALID_ARGUMENT naming the field, ALREADY_EXISTS, UNAVAILABLE)."""
        try:
            params = validate(request, self._engine_loop.limits, self._identity)
            return await self._engine_loop.add_request(request.request_id, list(request.prompt_token_ids), params,
                                                       **options)
        except RequestIdInUse as err:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(err))
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except (EngineStopped, EngineFailed) as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))

    async def Generate(self, request: worker_pb2.WorkerGenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.WorkerGenerateResponse]:
        stream = await self._start(context, request, validate_generate,
                                   output_token_ids=list(request.output_token_ids), priority=request.priority,
                                   remote_prefill=request.remote_prefill)
        # Cancellation (the caller went away or its deadline passed) raises
        # CancelledError at the await below; close() then aborts it in the engine.
        try:
            if request.remote_prefill:
                cached = stream.reserved_cached_tokens
                if cached is not None:
                    self._reservations[request.request_id] = (cached, len(request.prompt_token_ids))
                yield worker_pb2.WorkerGenerateResponse(reservation=worker_pb2.KVReservation(
                    reserved=cached is not None, num_cached_tokens=cached or 0))
            async for output in stream:
                if output.finish_reason == "error":
                    # An expired reservation is not the request's fault: ABORTED tells the
                    # coordinator to prefill it where it decodes instead.
                    code = grpc.StatusCode.ABORTED if output.error == RESERVATION_EXPIRED \
                        else grpc.StatusCode.INVALID_ARGUMENT
                    await context.abort(code, output.error or "request failed")
                yield response_from_output(output)
        except (EngineStopped, EngineFailed) as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        finally:
            self._reservations.pop(request.request_id, None)
            stream.close()

    async def Prefill(self, request: worker_pb2.PrefillRequest,
                      context: grpc.aio.ServicerContext) -> worker_pb2.PrefillResponse:
        """Computes the prompt and pushes its KV piece by piece as the engine makes it ready
        (kv_push.py); a failed push is the decode group's or the link's, not ours:
        FAILED_PRECONDITION (ABORTED for a broken link) keeps this group healthy."""
        stream = await self._start(context, request, validate_prefill, kv_export_from=request.num_skip_tokens)
        session, last = None, None
        try:
            link = self._links.get(request.kv_link_id) if request.kv_link_id else None
            async for output in stream:
                if output.kv_export is not None:
                    remaining_s = context.time_remaining()
                    session = session or self._pusher.session(
                        request.decode_address, request.decode_request_id, self._links, link,
                        None if remaining_s is None else remaining_s + self._links.timeout_s)
                    await session.send(output.kv_export)
                last = output
            if session is None or last is None or not last.new_token_ids:
                detail = f"{last.finish_reason}: {last.error or 'no detail'}" if last else "no output"
                await context.abort(grpc.StatusCode.INTERNAL, f"prefill ended without KV ({detail})")
            first = last.new_token_ids[0]
            first_logprobs = logprobs_to_proto(first, last.logprobs[0]) if last.logprobs else None
            num_bytes, transfer_s = await session.commit(commit_chunk(request.decode_request_id, first,
                                                                      first_logprobs))
            session = None
        except (EngineStopped, EngineFailed) as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        except grpc.aio.AioRpcError as err:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"decode_address {request.decode_address}: {err.code().name}: {err.details()}")
        except (KeyError, LinkBroken) as err:   # ABORTED: the coordinator drops the link and opens a new one
            await context.abort(grpc.StatusCode.ABORTED, f"kv_link_id: {err.args[0]}")
        except RuntimeError as err:   # the decode group ended the push early
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"decode_address {request.decode_address}: {err}")
        finally:
            stream.close()
            if session is not None:
                session.abort()
        return worker_pb2.PrefillResponse(first_token_id=first, num_kv_bytes=num_bytes, transfer_s=transfer_s,
                                          num_cached_tokens=last.num_cached_tokens)

    async def PushKV(self, request_iterator: AsyncIterator[worker_pb2.KVChunk],
                     context: grpc.aio.ServicerContext) -> worker_pb2.PushKVResponse:
        chunks = aiter(request_iterator)
        try:
            header = await anext(chunks, None)
            if header is None:
                raise ValueError("commit: the stream ended without a commit chunk")
            if header.link_id:
                start_token, k, v, commit = await self._receive_over_link(header, chunks)
            else:
                start_token, k, v, commit = await self._receive_chunks(header, chunks)
            if commit.first_token_id >= self._engine_loop.limits.vocab_size:
                raise ValueError(f"first_token_id: {commit.first_token_id} is not below the vocabulary size "
                                 f"{self._engine_loop.limits.vocab_size}")
            logprobs = logprobs_from_proto(commit.first_logprobs) if commit.has_logprobs else None
            await self._engine_loop.commit_remote_kv(commit.request_id, start_token, k, v, commit.first_token_id,
                                                     logprobs)
        except KeyError as err:
            await context.abort(grpc.StatusCode.NOT_FOUND, err.args[0])
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except LinkBroken as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"link_id: {err}")
        except (EngineStopped, EngineFailed) as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        pieces = k + v if isinstance(k, list) else [k, v]
        return worker_pb2.PushKVResponse(num_bytes=sum(piece.nbytes for piece in pieces))

    async def _receive_chunks(self, first: worker_pb2.KVChunk, chunks: AsyncIterator[worker_pb2.KVChunk]):
        """(start token, k, v, commit chunk) of a stream that carries the bytes itself."""
        request_id, chunk = first.request_id, first
        assembler = self._assembler(request_id)
        while not chunk.commit:
            assembler.add(chunk)
            chunk = await anext(chunks, None)
            if chunk is None:
                raise ValueError("commit: the stream ended without a commit chunk")
            if chunk.request_id != request_id:
                raise ValueError(f"request_id: chunk for {chunk.request_id!r} in the stream of {request_id!r}")
        assembler.check_complete()
        return assembler.start_token, assembler.k, assembler.v, chunk

    async def _receive_over_link(self, header: worker_pb2.KVChunk, chunks: AsyncIterator[worker_pb2.KVChunk]):
        """(start token, k, v, commit chunk) of a stream whose pieces' bytes come over a pair
        link: a header per piece, then the commit. With no reservation here the pieces
        are drained (the link stays in step) and the answer is NOT_FOUND."""
        limits = self._engine_loop.limits
        assembly = PieceAssembly(self._reservations.get(header.request_id))
        message = header
        while not message.commit:
            if not message.link_id or message.request_id != header.request_id:
                self._links.close(header.link_id)   # its sender may be sending already
                raise ValueError(f"link_id: message for {message.request_id!r} without a link or out of place in "
                                 f"the transfer of {header.request_id!r}")
            k, v = await receive_over_link(self._links, message, limits.kv_shape, limits.kv_dtype,
                                           limits.max_model_len)
            assembly.add(message.start_token, k, v)
            try:   # the next piece comes once the prefill group computed it
                message = await asyncio.wait_for(anext(chunks, None), self._links.timeout_s)
            except asyncio.TimeoutError:
                raise ValueError(f"commit: nothing came for {self._links.timeout_s:.0f} s") from None
            if message is None:
                raise ValueError("commit: the stream ended without a commit chunk")
        if message.request_id != header.request_id:
            raise ValueError(f"request_id: the commit for {message.request_id!r} ends the transfer of "
                             f"{header.request_id!r}")
        if assembly.reserved is None:
            raise KeyError(f"request_id: {header.request_id!r} holds no KV reservation here (aborted or expired)")
        start, k, v = assembly.result()
        return start, k, v, message

    async def OpenKVLink(self, request: worker_pb2.OpenKVLinkRequest,
                         context: grpc.aio.ServicerContext) -> worker_pb2.OpenKVLinkResponse:
        try:
            unique_id = await self._links.open(request.link_id, request.transport, request.rank, request.unique_id)
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except LinkBroken as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        return worker_pb2.OpenKVLinkResponse(unique_id=unique_id)

    async def CloseKVLink(self, request: worker_pb2.CloseKVLinkRequest,
                          context: grpc.aio.ServicerContext) -> worker_pb2.CloseKVLinkResponse:
        return worker_pb2.CloseKVLinkResponse(found=self._links.close(request.link_id))

    def _assembler(self, request_id: str) -> KVAssembler:
        """KeyError when the request holds no reservation here."""
        if request_id not in self._reservations:
            raise KeyError(f"request_id: {request_id!r} holds no KV reservation here (aborted or expired)")
        start, stop = self._reservations[request_id]
        num_layers, num_kv_heads, head_dim = self._engine_loop.limits.kv_shape
        return KVAssembler(start, stop, num_layers, num_kv_heads, head_dim, self._engine_loop.limits.kv_dtype)

    async def Abort(self, request: shardline_pb2.AbortRequest,
                    context: grpc.aio.ServicerContext) -> shardline_pb2.AbortResponse:
        try:
            found = await self._engine_loop.abort(request.request_id)
        except (EngineStopped, EngineFailed) as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        return shardline_pb2.AbortResponse(found=found)

    async def GetStatus(self, request: worker_pb2.WorkerStatusRequest,
                        context: grpc.aio.ServicerContext) -> worker_pb2.WorkerStatus:
        status = self.status()
        if request.check_integrity:
            try:
                status.integrity_error = await self._engine_loop.check_integrity()
            except (EngineStopped, EngineFailed) as err:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        return status

    async def StreamKVEvents(self, request: worker_pb2.KVEventsRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.KVEventBatch]:
        try:
            subscription = await self._engine_loop.subscribe_kv_events()
        except (EngineStopped, EngineFailed) as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        try:
            async for batch in subscription:
                yield kv_batch_to_proto(batch)
        except SubscriberLagged as err:
            await context.abort(grpc.StatusCode.ABORTED, str(err))
        except (EngineStopped, EngineFailed) as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        finally:
            subscription.close()


@dataclass
class WorkerServer:
    server: grpc.aio.Server
    port: int                       # the bound port (the requested one, or the one picked for 0)
    health: health.aio.HealthServicer

    async def stop(self, grace_s: float) -> None:
        """Health NOT_SERVING, refuse new calls, give running ones `grace_s` to end."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def start_worker_server(service: WorkerService, host: str, port: int,
                              max_message_bytes: int) -> WorkerServer:
    options = [("grpc.max_send_message_length", max_message_bytes),
               ("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=options)
    worker_pb2_grpc.add_WorkerServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (WORKER_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound_port = server.add_insecure_port(format_address(host, port))
    if bound_port == 0:
        raise OSError(f"--port: cannot listen on {format_address(host, port)}")
    await server.start()
    serving = health_pb2.HealthCheckResponse.SERVING   # the model is loaded before the server starts
    for name in ("", WORKER_SERVICE_NAME):
        await health_servicer.set(name, serving)
    return WorkerServer(server, bound_port, health_servicer)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
