"""In-process fake engine groups for coordinator tests: a Worker service
whose "model" is a formula (token = f(prompt, position, seed)), so a
request resumed on another group continues exactly where it left off, plus
the Register/Heartbeat loop a real worker runs. No model, no processes.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml

from shardline.coordinator.cluster_config import load_cluster_config
from shardline.coordinator.server import Cluster, start_cluster
from shardline.coordinator.validation import load_tokenizer
from shardline.proto import shardline_pb2 as pb
from shardline.proto import shardline_pb2_grpc, worker_pb2, worker_pb2_grpc
from shardline.worker.block_hash import block_hashes

BLOCK = 16
MAX_MODEL_LEN = 512
NUM_KV_BLOCKS = 64


def fake_token(prompt_ids, position: int, seed: int) -> int:
    return (sum(prompt_ids) * 7 + position * 13 + seed) % 40000


def expected_tokens(prompt_ids, max_tokens: int, seed: int) -> list[int]:
    return [fake_token(prompt_ids, i, seed) for i in range(max_tokens)]


@dataclass
class FakeWorker(worker_pb2_grpc.WorkerServicer):
    name: str
    token_delay_s: float = 0.01
    fail_after_tokens: int | None = None      # one-shot: abort a stream with UNAVAILABLE after this many
    requests: list = field(default_factory=list)
    cancelled: list = field(default_factory=list)
    cached: set = field(default_factory=set)
    active: set = field(default_factory=set)
    _subscribers: list = field(default_factory=list)
    _sequence: int = 0

    async def Generate(self, request, context):
        self.requests.append(request)
        if request.sampling.max_tokens <= len(request.output_token_ids):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "output_token_ids: nothing left to generate")
        prompt, out = list(request.prompt_token_ids), list(request.output_token_ids)
        hashes = block_hashes(prompt, BLOCK)
        num_cached = sum(1 for _ in iter_prefix(hashes, self.cached)) * BLOCK
        self._store(hashes)
        self.active.add(request.request_id)
        try:
            while len(out) < request.sampling.max_tokens:
                await asyncio.sleep(self.token_delay_s)
                if self.fail_after_tokens is not None and len(out) >= self.fail_after_tokens:
                    self.fail_after_tokens = None
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "fake worker fell over")
                token = fake_token(prompt, len(out), request.sampling.seed)
                out.append(token)
                done = len(out) >= request.sampling.max_tokens
                yield worker_pb2.WorkerGenerateResponse(
                    token_ids=[token], text=f"<{token}>", num_prompt_tokens=len(prompt),
                    num_cached_tokens=num_cached, finish_reason=pb.FINISH_REASON_LENGTH if done else 0)
        except (asyncio.CancelledError, GeneratorExit):
            # A call cancelled while grpc sends a response closes this generator at its yield
            # (GeneratorExit) instead of cancelling it.
            self.cancelled.append(request.request_id)
            raise
        finally:
            self.active.discard(request.request_id)

    async def GetStatus(self, request, context):
        return self.status()

    async def StreamKVEvents(self, request, context):
        queue: asyncio.Queue = asyncio.Queue()
        self._subscribers.append(queue)
        try:
            yield worker_pb2.KVEventBatch(sequence_number=self._sequence, snapshot=True,
                                          snapshot_hashes=sorted(self.cached))
            while True:
                yield await queue.get()
        finally:
            self._subscribers.remove(queue)

    def status(self) -> worker_pb2.WorkerStatus:
        used = min(len(self.active) * 2, NUM_KV_BLOCKS)
        return worker_pb2.WorkerStatus(group=self.name, max_model_len=MAX_MODEL_LEN, block_size_tokens=BLOCK,
                                       num_running=len(self.active), num_kv_blocks=NUM_KV_BLOCKS,
                                       num_free_kv_blocks=NUM_KV_BLOCKS - used, kv_usage=used / NUM_KV_BLOCKS)

    def _store(self, hashes) -> None:
        new = [h for h in hashes if h not in self.cached]
        if not new:
            return
        self.cached.update(new)
        self._sequence += 1
        batch = worker_pb2.KVEventBatch(sequence_number=self._sequence, events=[
            worker_pb2.KVEvent(kind=worker_pb2.KVEvent.KIND_STORED, block_hashes=new)])
        for queue in self._subscribers:
            queue.put_nowait(batch)


def iter_prefix(hashes, held):
    for h in hashes:
        if h not in held:
            return
        yield h


@dataclass
class FakeGroup:
    worker: FakeWorker
    server: grpc.aio.Server
    address: str
    link: asyncio.Task | None = None

    async def kill(self) -> None:
        """Like SIGKILL: streams break, heartbeats stop."""
        if self.link is not None:
            self.link.cancel()
        await self.server.stop(0)


async def start_fake_group(name: str, coordinator: str, heartbeat_interval_s: float, **worker_settings) -> FakeGroup:
    worker = FakeWorker(name, **worker_settings)
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(worker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    group = FakeGroup(worker, server, f"127.0.0.1:{port}")
    group.link = asyncio.ensure_future(_link(group, coordinator, heartbeat_interval_s))
    return group


async def _link(group: FakeGroup, coordinator: str, interval_s: float) -> None:
    async with grpc.aio.insecure_channel(coordinator) as channel:
        stub = worker_pb2_grpc.CoordinatorStub(channel)
        while True:
            await stub.Register(worker_pb2.RegisterRequest(group=group.worker.name, address=group.address,
                                                           role="mixed", model="m", tp=1, pp=1))
            while True:
                await asyncio.sleep(interval_s)
                reply = await stub.Heartbeat(worker_pb2.HeartbeatRequest(group=group.worker.name,
                                                                         status=group.worker.status()))
                if not reply.known:
                    break


def write_config(folder: Path, num_groups: int = 2, **coordinator) -> Path:
    # A group misses heartbeats for 3 s before it is unhealthy: a loaded machine's pauses (a full
    # garbage collection of this process takes 0.2-0.3 s) stay far inside it.
    settings = {"host": "127.0.0.1", "port": 0, "heartbeat_interval_s": 0.1, "heartbeat_timeout_s": 3.0,
                "startup_timeout_s": 10, **coordinator}
    data = {"model": "default", "served_model_name": "fake", "coordinator": settings,
            "groups": [{"name": "w", "replicas": num_groups}] if num_groups > 1 else [{"name": "w"}]}
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@dataclass
class FakeCluster:
    cluster: Cluster
    groups: list[FakeGroup]
    channel: grpc.aio.Channel

    @property
    def stub(self) -> shardline_pb2_grpc.ShardlineStub:
        return shardline_pb2_grpc.ShardlineStub(self.channel)

    async def stop(self) -> None:
        await self.channel.close()
        for group in self.groups:
            await group.kill()
        await self.cluster.stop()


async def start_fake_cluster(config_path: Path, tokenizer, **worker_settings) -> FakeCluster:
    config = load_cluster_config(config_path)
    cluster = await start_cluster(config, config_path, launch=False, tokenizer=tokenizer)
    names = [s.name for s in config.group_specs()]
    interval_s = config.coordinator.heartbeat_interval_s
    groups = [await start_fake_group(n, cluster.control_address, interval_s, **worker_settings) for n in names]
    for _ in range(200):
        if cluster.registry.is_ready(names) and all(
                cluster.registry.get(n) and _index_synced(cluster, n) for n in names):
            break
        await asyncio.sleep(0.02)
    return FakeCluster(cluster, groups, grpc.aio.insecure_channel(cluster.address))


def _index_synced(cluster: Cluster, name: str) -> bool:
    return cluster.prefix_index.in_sync(name)


# -- helpers for the tests -----------------------------------------------------------

@functools.cache
def shared_tokenizer():
    """The embedded model's tokenizer, loaded once per test session (it takes seconds)."""
    return load_tokenizer("default")


def run(tmp_path, tokenizer, scenario, coordinator=None, **worker_settings):
    async def main():
        fake = await start_fake_cluster(write_config(tmp_path, **(coordinator or {})), tokenizer, **worker_settings)
        try:
            return await asyncio.wait_for(scenario(fake), 30)
        finally:
            await fake.stop()
    return asyncio.run(main())


def request(ids=(1, 2, 3), max_tokens=4, seed=7, **fields) -> pb.GenerateRequest:
    sampling = pb.SamplingOptions(max_tokens=max_tokens, seed=seed, temperature=0.0)
    if "prompt" in fields:
        return pb.GenerateRequest(sampling=sampling, **fields)
    return pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=list(ids)), sampling=sampling, **fields)


async def collect(stub, req, **call_kwargs):
    """(responses, status code) of one Generate."""
    responses = []
    try:
        async for response in stub.Generate(req, **call_kwargs):
            responses.append(response)
    except grpc.aio.AioRpcError as err:
        return responses, err.code(), err.details()
    return responses, grpc.StatusCode.OK, ""


async def read_rest(call) -> list:
    """The remaining responses of a call already read with read()."""
    rest = []
    while (response := await call.read()) is not grpc.aio.EOF:
        rest.append(response)
    return rest


def tokens_of(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]


async def until(condition, timeout_s: float = 5.0) -> None:
    """Polls `condition` (every 10 ms) until it holds; fails after timeout_s."""
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")
