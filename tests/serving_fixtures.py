"""Helpers for tests/test_serving.py: prompt cases and their offline
references (LLMEngine in this process), a real local cluster run on an
event loop of its own, and the experiments the tests assert on (KV-aware
routing, cancel, SIGKILL) as coroutines that run on that loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from shardline.coordinator.cluster_config import load_cluster_config
from shardline.coordinator.server import Cluster, start_cluster
from shardline.proto import shardline_pb2 as pb
from shardline.proto import shardline_pb2_grpc
from shardline.worker.proto_convert import finish_reason_to_proto
from shardline.worker.sampling_params import SamplingParams
from tls_cert import self_signed_cert

TOKEN_ENV, TOKEN = "SHARDLINE_SERVING_TEST_TOKEN", "serving-test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
REPLICAS = 2
ENGINE = {"backend": "numpy", "num_kv_blocks": 512, "max_num_seqs": 64, "block_size_tokens": 16}
PASSAGE = (
    "The lighthouse stood at the edge of the northern cliffs, where the sea turned grey in winter and green "
    "in summer. Its keeper, an old sailor named Tomas, climbed the spiral stairs every evening to light the "
    "lamp. Ships passing in the night saw the beam sweep across the water and knew the rocks were near. "
    "In the village below, children told stories about the keeper and his dog, a shaggy animal that "
    "barked at gulls and slept by the stove. Nobody remembered when the lighthouse was built, but the "
    "stones were worn smooth by centuries of wind, and the iron railing had rusted to the color of autumn "
    "leaves. Every spring the fishermen repaired their nets on the harbor wall and argued about the weather."
)


@dataclass(frozen=True)
class PromptCase:
    text: str
    max_tokens: int
    temperature: float = 0.0
    seed: int = 0
    ignore_eos: bool = False
    request_id: str = ""

    @property
    def key(self) -> str:
        return f"{self.seed}/{self.temperature}/{self.max_tokens}/{self.text}"

    def params(self) -> SamplingParams:
        top_p = 0.95 if self.temperature else 1.0
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=top_p,
                              seed=self.seed, ignore_eos=self.ignore_eos)

    def request(self) -> pb.GenerateRequest:
        p = self.params()
        return pb.GenerateRequest(request_id=self.request_id, prompt=self.text, sampling=pb.SamplingOptions(
            max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, seed=p.seed,
            ignore_eos=p.ignore_eos))


def sampling(text: str, max_tokens: int, **settings) -> PromptCase:
    return PromptCase(text, max_tokens, **settings)


def prompts_of_mixed_lengths(count: int, seed_base: int = 0, max_tokens: tuple[int, int] = (2, 8)) -> list[PromptCase]:
    """Prompts of 3 to 40 words; every other one greedy, the rest seeded sampling."""
    words = PASSAGE.split()
    low, high = max_tokens
    cases = []
    for i in range(count):
        length, start = 3 + (i * 7) % 38, (i * 13) % len(words)
        text = " ".join((words * 2)[start:start + length])
        cases.append(PromptCase(text, low + i % (high - low + 1), 0.0 if i % 2 == 0 else 0.8, seed_base + i))
    return cases


@dataclass(frozen=True)
class Reference:
    token_ids: list[int]
    text: str
    finish_reason: int


def offline_references(cases: list[PromptCase]) -> dict[str, Reference]:
    from shardline.worker.engine import EngineConfig, LLMEngine  # model code: tests only
    from shardline.worker.offline import load_local

    engine = LLMEngine(EngineConfig(**ENGINE), load_local(None, backend="numpy", show_progress=False))
    completions = engine.generate([c.text for c in cases], [c.params() for c in cases])
    return {c.key: Reference(list(done.token_ids), done.text, finish_reason_to_proto(done.finish_reason))
            for c, done in zip(cases, completions)}


async def collect(stub, request, metadata=AUTH, **call_kwargs):
    """(responses, status code, details) of one Generate."""
    responses = []
    try:
        async for response in stub.Generate(request, metadata=metadata, **call_kwargs):
            responses.append(response)
    except grpc.aio.AioRpcError as err:
        return responses, err.code(), err.details()
    return responses, grpc.StatusCode.OK, ""


def write_cluster_config(folder: Path, cert: tuple[Path, Path] | None, replicas: int = REPLICAS,
                         with_auth: bool = True) -> Path:
    coordinator = {"host": "127.0.0.1", "port": 0, "heartbeat_interval_s": 0.25, "heartbeat_timeout_s": 3.0,
                   "startup_timeout_s": 240, "limits": {"max_in_flight": 128, "max_message_bytes": 1 << 20}}
    if with_auth:
        coordinator["auth_token_env"] = TOKEN_ENV
    if cert is not None:
        coordinator["tls"] = {"cert_file": str(cert[0]), "key_file": str(cert[1])}
    data = {"model": "default", "served_model_name": "smollm2", "coordinator": coordinator, "engine": ENGINE,
            "groups": [{"name": "replica", "replicas": replicas}] if replicas > 1 else [{"name": "replica"}]}
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@contextlib.contextmanager
def served_cluster(folder: Path):
    cert = self_signed_cert(folder)
    path = write_cluster_config(folder, cert)
    os.environ[TOKEN_ENV] = TOKEN
    try:
        with running_cluster(path, cert) as served:
            yield served
    finally:
        os.environ.pop(TOKEN_ENV, None)


@contextlib.contextmanager
def running_cluster(path: Path, cert: tuple[Path, Path] | None = None):
    """The cluster of config `path` served from an event loop on a thread of its own;
    afterwards no worker process it started is left."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="cluster-loop", daemon=True)
    thread.start()

    def run(coro, timeout_s: float):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout_s)

    try:
        cluster = run(start_cluster(load_cluster_config(path), path), 300)
        pids = [p.process.pid for p in cluster.launcher.processes.values()]
        try:
            channel = run(_open_channel(cluster.address, cert), 10)
            yield Served(loop, cluster, channel, [s.name for s in cluster.config.group_specs()], cert is not None)
            run(channel.close(), 10)
        finally:
            run(cluster.stop(), 60)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    for pid in pids:
        assert not _alive(pid), f"worker {pid} outlived the cluster"


async def _open_channel(address: str, cert) -> grpc.aio.Channel:
    if cert is None:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=cert[0].read_bytes()))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Served:
    loop: asyncio.AbstractEventLoop
    cluster: Cluster
    channel: grpc.aio.Channel
    group_names: list[str]
    tls: bool

    def run(self, coro, timeout_s: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stub(self) -> shardline_pb2_grpc.ShardlineStub:
        return shardline_pb2_grpc.ShardlineStub(self.channel)

    async def stats(self) -> pb.GetStatsResponse:
        return await self.stub().GetStats(pb.GetStatsRequest(), metadata=AUTH)

    async def group_stats(self, name: str) -> pb.GroupStats:
        return next(g for g in (await self.stats()).groups if g.name == name)

    async def health(self) -> str:
        reply = await health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service="shardline.v1.Shardline"))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def reflected_services(self) -> set[str]:
        call = reflection_pb2_grpc.ServerReflectionStub(self.channel).ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        answer = await call.read()
        await call.done_writing()
        return {s.name for s in answer.list_services_response.service}

    async def raw_generate(self, data: bytes):
        """Generate with bytes as they are (protobuf would refuse to build them)."""
        call = self.channel.unary_stream("/shardline.v1.Shardline/Generate")(data, metadata=AUTH)
        try:
            return [r async for r in call], grpc.StatusCode.OK, ""
        except grpc.aio.AioRpcError as err:
            return [], err.code(), err.details()

    async def poll_group(self, name: str, condition, timeout_s: float = 10.0) -> pb.GroupStats:
        """The group's stats once `condition(stats)` holds (heartbeats refresh them)."""
        deadline_s = time.monotonic() + timeout_s
        while True:
            stats = await self.group_stats(name)
            if condition(stats) or time.monotonic() > deadline_s:
                return stats
            await asyncio.sleep(0.05)

    def router_counters(self) -> tuple[int, int]:
        return self.cluster.router.routed_prompt_blocks, self.cluster.router.predicted_cached_blocks


def share(counter: Counter, total: int) -> dict[str, float]:
    return {k: round(v / total, 3) for k, v in counter.items()}
