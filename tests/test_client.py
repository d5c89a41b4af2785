"""The Python clients and the CLI's `--url` commands against a real gRPC
server on 127.0.0.1 implementing `shardline.v1.Shardline`: it echoes the
prompt back one character per message (token id = code point), validates
sampling options as the coordinator does, and records metadata and
cancellations, so every assertion checks something the server computed."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shardline.client.client import (
    AsyncShardlineClient, ShardlineClient, ShardlineError, Usage, build_request)
from shardline.proto import shardline_pb2 as pb
from shardline.proto import shardline_pb2_grpc as pb_grpc
from shardline.worker.proto_convert import sampling_params_from_proto

ENDLESS = "endless"  # a prompt the server streams until the client goes away


class EchoShardline(pb_grpc.ShardlineServicer):
    def __init__(self, token: str | None = None):
        self.token = token
        self.metadata: list[dict[str, str]] = []
        self.requests: list[pb.GenerateRequest] = []
        self.cancelled: dict[str, threading.Event] = {}
        self._ids = itertools.count()

    def _check_auth(self, context) -> None:
        metadata = dict(context.invocation_metadata())
        self.metadata.append(metadata)
        if self.token and metadata.get("authorization") != f"Bearer {self.token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    def Generate(self, request, context):
        self._check_auth(context)
        self.requests.append(request)
        request_id = request.request_id or f"req-{next(self._ids)}"
        if not request.prompt:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt must not be empty")
        try:
            params = sampling_params_from_proto(request.sampling, default_max_tokens=256, max_tokens_limit=4096)
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        cancelled = self.cancelled[request_id] = threading.Event()
        finished = []
        context.add_callback(lambda: None if finished else cancelled.set())
        if request.prompt == ENDLESS:
            yield from self._endless(request_id, context)
            return
        yield from self._echo(request_id, request.prompt, params)
        finished.append(True)

    def _endless(self, request_id, context):
        while context.is_active():
            yield pb.GenerateResponse(request_id=request_id, text=".", token_ids=[46], group="g0")
            time.sleep(0.01)

    def _echo(self, request_id, prompt, params):
        text, reason, stop_reason = prompt[: params.max_tokens], pb.FINISH_REASON_LENGTH, ""
        if len(prompt) <= params.max_tokens:
            reason = pb.FINISH_REASON_STOP
        for stop in params.stop:
            if stop in text:
                text, reason, stop_reason = text[: text.index(stop)], pb.FINISH_REASON_STOP, stop
        for char in text:
            yield pb.GenerateResponse(request_id=request_id, text=char, token_ids=[ord(char)], group="g0")
        usage = pb.Usage(prompt_tokens=len(prompt), completion_tokens=len(text))
        yield pb.GenerateResponse(request_id=request_id, finish_reason=reason, stop_reason=stop_reason,
                                  usage=usage, group="g0")

    def Abort(self, request, context):
        self._check_auth(context)
        return pb.AbortResponse(found=request.request_id in self.cancelled)

    def ListModels(self, request, context):
        self._check_auth(context)
        return pb.ListModelsResponse(models=[pb.ModelInfo(name="echo", max_model_len=4096, num_groups=2)])

    def GetStats(self, request, context):
        self._check_auth(context)
        groups = [pb.GroupStats(name=f"g{i}", role="mixed", healthy=i == 0, num_kv_blocks=100,
                                num_free_kv_blocks=100 - 10 * i, kv_usage=0.1 * i,
                                requests_routed=len(self.requests)) for i in range(2)]
        return pb.GetStatsResponse(groups=groups, requests_total=len(self.requests), queue_depth=3)


class Server:
    def __init__(self, token: str | None = None):
        self.servicer = EchoShardline(token)
        self.health = health.HealthServicer()
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        pb_grpc.add_ShardlineServicer_to_server(self.servicer, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        self.address = f"127.0.0.1:{self.grpc.add_insecure_port('127.0.0.1:0')}"
        self.grpc.start()

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set("shardline.v1.Shardline", status)


@pytest.fixture
def server():
    srv = Server()
    yield srv
    srv.grpc.stop(None)


@pytest.fixture
def client(server):
    with ShardlineClient(server.address, timeout_s=10) as c:
        yield c


def test_generate_streams_one_chunk_per_character(client):
    chunks = list(client.generate("hello", max_tokens=3))
    assert [c.text for c in chunks] == ["h", "e", "l", ""]
    assert [c.token_ids for c in chunks[:3]] == [(104,), (101,), (108,)]
    assert [c.finish_reason for c in chunks] == [None, None, None, "length"]
    assert chunks[-1].usage == Usage(prompt_tokens=5, completion_tokens=3, cached_tokens=0)
    assert chunks[0].usage is None and {c.group for c in chunks} == {"g0"}
    assert len({c.request_id for c in chunks}) == 1


def test_complete_collects_the_stream_and_passes_options(server, client):
    done = client.complete("hello world", stop=["o w"], temperature=0.0, seed=7, top_k=5, chat=True,
                           model="echo", priority=2, request_id="mine")
    assert (done.text, done.finish_reason, done.request_id) == ("hell", "stop", "mine")
    assert done.token_ids == tuple(map(ord, "hell")) and done.usage.completion_tokens == 4
    sent = server.servicer.requests[-1]
    assert sent.sampling.HasField("temperature") and not sent.sampling.HasField("top_p")
    assert (sent.sampling.seed, sent.sampling.top_k, sent.chat, sent.model, sent.priority) == (7, 5, True, "echo", 2)


def test_token_ids_prompt():
    request = build_request([1, 2, 3], max_tokens=4)
    assert request.WhichOneof("input") == "prompt_token_ids" and list(request.prompt_token_ids.ids) == [1, 2, 3]


@pytest.mark.parametrize("prompt, options, code, message", [
    ("", {}, "INVALID_ARGUMENT", "prompt must not be empty"),
    ("hi", {"top_p": 1.5}, "INVALID_ARGUMENT", "sampling.top_p must be in (0, 1], got 1.5"),
    ("hi", {"max_tokens": 5000}, "INVALID_ARGUMENT", "sampling.max_tokens must be at most 4096"),
])
def test_errors_carry_code_and_server_message(client, prompt, options, code, message):
    with pytest.raises(ShardlineError) as info:
        client.complete(prompt, **options)
    assert info.value.code == code and message in info.value.message


def test_unreachable_server_is_unavailable():
    with ShardlineClient("127.0.0.1:1", timeout_s=5) as c, pytest.raises(ShardlineError) as info:
        c.stats()
    assert info.value.code == "UNAVAILABLE"


def test_bearer_token_is_sent():
    srv = Server(token="s3cret")
    try:
        with ShardlineClient(srv.address, token="s3cret") as c:
            assert c.complete("ok").text == "ok"
        assert srv.servicer.metadata[-1]["authorization"] == "Bearer s3cret"
        with ShardlineClient(srv.address, token="wrong") as c, pytest.raises(ShardlineError) as info:
            c.list_models()
        assert info.value.code == "UNAUTHENTICATED" and "bearer token" in info.value.message
    finally:
        srv.grpc.stop(None)


def test_breaking_out_of_the_loop_cancels_the_rpc(server, client):
    for chunk in client.generate(ENDLESS, request_id="a"):
        break
    assert server.servicer.cancelled["a"].wait(5)


def test_closing_the_stream_cancels_the_rpc(server, client):
    with client.generate(ENDLESS, request_id="b") as stream:
        assert next(stream).text == "."
        assert not server.servicer.cancelled["b"].is_set()
    assert server.servicer.cancelled["b"].wait(5)


def test_a_finished_stream_is_not_cancelled(server, client):
    assert client.complete("abc", request_id="c").text == "abc"
    time.sleep(0.1)
    assert not server.servicer.cancelled["c"].is_set()


def test_abort_models_and_stats(server, client):
    client.complete("x", request_id="known")
    assert client.abort("known") and not client.abort("unknown")
    assert [(m.name, m.num_groups) for m in client.list_models()] == [("echo", 2)]
    stats = client.stats()
    assert (stats.requests_total, stats.queue_depth) == (1, 3)
    assert [(g.name, g.healthy, g.num_free_kv_blocks) for g in stats.groups] == [("g0", True, 100), ("g1", False, 90)]


def test_wait_ready_waits_for_serving(server, client):
    server.set_serving(False)
    with pytest.raises(ShardlineError) as info:
        client.wait_ready(timeout_s=0.3)
    assert info.value.code == "DEADLINE_EXCEEDED"
    start = time.monotonic()   # before the timer: a late start would shorten what is measured
    threading.Timer(0.3, server.set_serving, (True,)).start()
    client.wait_ready(timeout_s=5)
    assert time.monotonic() - start >= 0.25


def test_async_client(server):
    async def run():
        async with AsyncShardlineClient(server.address, token="t", timeout_s=10) as c:
            await c.wait_ready(5)
            texts = [chunk.text async for chunk in c.generate("abc")]
            done = await c.complete("hello", max_tokens=4)
            with pytest.raises(ShardlineError) as info:
                await c.complete("")
            async with c.generate(ENDLESS, request_id="async") as stream:
                async for chunk in stream:
                    break
            return texts, done, info.value, (await c.stats()).requests_total

    texts, done, error, total = asyncio.run(run())
    assert texts == ["a", "b", "c", ""] and (done.text, done.finish_reason) == ("hell", "length")
    assert (error.code, error.message) == ("INVALID_ARGUMENT", "prompt must not be empty")
    assert server.servicer.cancelled["async"].wait(5) and total == 4
    assert server.servicer.metadata[-1]["authorization"] == "Bearer t"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardline.client.cli", *args], capture_output=True, text=True,
                          timeout=60)


def test_cli_generate_url_streams_the_continuation(server):
    result = run_cli("generate", "--url", server.address, "--max-tokens", "9", "--stop", "o", "hello world")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hell\n"
    sent = server.servicer.requests[-1].sampling
    assert (sent.max_tokens, sent.temperature, list(sent.stop)) == (9, 0.0, ["o"])


@pytest.mark.parametrize("args, message", [
    (["--top-p", "0", "hi"], "INVALID_ARGUMENT: sampling.top_p must be in (0, 1], got 0.0"),
    ([""], "INVALID_ARGUMENT: prompt must not be empty"),
])
def test_cli_generate_url_error_exits_2_with_the_server_message(server, args, message):
    result = run_cli("generate", "--url", server.address, *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_cli_token():
    srv = Server(token="abc")
    try:
        assert run_cli("generate", "--url", srv.address, "--token", "abc", "hi").stdout == "hi\n"
        denied = run_cli("status", "--url", srv.address)
        assert denied.returncode == 2 and "UNAUTHENTICATED: missing or wrong bearer token" in denied.stderr
    finally:
        srv.grpc.stop(None)


@pytest.mark.parametrize("plain", [False, True], ids=["rich", "plain"])
def test_cli_status_prints_the_groups(server, client, plain):
    client.complete("x")
    result = run_cli("status", "--url", server.address, *(["--plain"] if plain else []))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "model echo: max_model_len 4096, 2 group(s)" in out and "requests total 1" in out
    rows = [line for line in out.splitlines() if "mixed" in line]
    assert len(rows) == 2 and "yes" in rows[0] and "NO" in rows[1] and "90/100" in rows[1]


def test_cli_status_unreachable_exits_2():
    result = run_cli("status", "--url", "127.0.0.1:1", "--timeout-s", "5")
    assert result.returncode == 2 and "UNAVAILABLE" in result.stderr and "Traceback" not in result.stderr


def test_cli_local_stop_needs_url():
    result = run_cli("generate", "--stop", "x", "hi")
    assert result.returncode == 2 and "--stop needs --url" in result.stderr
