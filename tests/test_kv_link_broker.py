"""The coordinator's pair-link broker (coordinator/kv_links.py) against two
gRPC servers on 127.0.0.1 that answer OpenKVLink / CloseKVLink / GetStatus
and record the calls: the transport choice, one link per (prefill, decode)
pair opened once however many hand-offs ask at the same time and then
reused, a failed open falling back to the stream and not retried during
the back-off, and links closed on both sides when dropped or when a group
turns unhealthy (a group that comes back gets a fresh link)."""

from __future__ import annotations

import asyncio

import grpc

from coordinator_fakes import until
from shardline.coordinator.kv_links import KVLinkBroker
from shardline.coordinator.registry import Registry
from shardline.proto import worker_pb2, worker_pb2_grpc


class LinkWorker(worker_pb2_grpc.WorkerServicer):
    def __init__(self, transports: list[str], fail_open: bool = False):
        self.transports, self.fail_open = transports, fail_open
        self.opened: list[tuple[str, int, bytes]] = []
        self.closed: list[str] = []

    async def GetStatus(self, request, context):
        return worker_pb2.WorkerStatus(kv_transports=self.transports, block_size_tokens=16)

    async def OpenKVLink(self, request, context):
        await asyncio.sleep(0.05)   # concurrent hand-offs pile up behind the first open
        if self.fail_open:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "link_id: cannot open")
        self.opened.append((request.link_id, request.rank, bytes(request.unique_id)))
        unique_id = f"uid-{request.link_id}".encode() if request.rank == 1 else request.unique_id
        return worker_pb2.OpenKVLinkResponse(unique_id=unique_id)

    async def CloseKVLink(self, request, context):
        self.closed.append(request.link_id)
        return worker_pb2.CloseKVLinkResponse(found=True)


async def serve(worker: LinkWorker) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(worker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def run_pair(scenario, prefill_worker: LinkWorker, decode_worker: LinkWorker, transport: str = "tcp"):
    async def main():
        servers = [await serve(w) for w in (prefill_worker, decode_worker)]
        registry = Registry(heartbeat_timeout_s=30.0)
        broker = KVLinkBroker(transport, registry)
        registry.register("p", servers[0][1], "prefill", "m", 1, 1)
        registry.register("d", servers[1][1], "decode", "m", 1, 1)
        await until(lambda: all(registry.get(n).status is not None for n in ("p", "d")))
        try:
            await scenario(broker, registry, servers)
        finally:
            await registry.close()
            for server, _ in servers:
                await server.stop(None)

    asyncio.run(main())


def test_one_link_per_pair_opened_once_then_reused():
    p, d = LinkWorker(["tcp"]), LinkWorker(["tcp"])

    async def scenario(broker, registry, _):
        prefill, decode = registry.get("p"), registry.get("d")
        ids = await asyncio.gather(*(broker.link_for(prefill, decode) for _ in range(5)))
        assert len(set(ids)) == 1 and ids[0]
        assert await broker.link_for(prefill, decode) == ids[0]
        assert [(r, u) for _, r, u in d.opened] == [(1, b"")]
        assert [(link, r, u) for link, r, u in p.opened] == [(ids[0], 0, f"uid-{ids[0]}".encode())]
        assert broker.num_opened == 1 and broker.open_links() == {("p", "d"): ids[0]}
        assert broker.transport_for(prefill, decode) == "tcp"
        broker.transport = "auto"   # auto wants nccl, which these leaders cannot open
        assert broker.transport_for(prefill, decode) is None
        broker.transport = "grpc"
        assert broker.transport_for(prefill, decode) is None

    run_pair(scenario, p, d)


def test_a_failed_open_falls_back_and_is_not_retried_during_the_back_off():
    p, d = LinkWorker(["tcp"]), LinkWorker(["tcp"], fail_open=True)

    async def scenario(broker, registry, _):
        prefill, decode = registry.get("p"), registry.get("d")
        assert await broker.link_for(prefill, decode) == ""
        await until(lambda: len(p.closed) == 1 and len(d.closed) == 1)   # both ends told to forget it
        d.fail_open = False
        assert await broker.link_for(prefill, decode) == ""   # within the back-off: no new try
        assert p.opened == [] and broker.num_opened == 0

    run_pair(scenario, p, d)


def test_links_close_on_both_sides_when_dropped_or_a_group_turns_unhealthy():
    p, d = LinkWorker(["tcp"]), LinkWorker(["tcp"])

    async def scenario(broker, registry, servers):
        prefill, decode = registry.get("p"), registry.get("d")
        first = await broker.link_for(prefill, decode)
        broker.drop(first)
        await until(lambda: p.closed == [first] and d.closed == [first])
        second = await broker.link_for(prefill, decode)
        assert second not in ("", first)
        registry.mark_unhealthy("p", "test")
        await until(lambda: d.closed == [first, second])
        assert broker.open_links() == {}
        registry.register("p", servers[0][1], "prefill", "m", 1, 1)   # back: a fresh link
        await until(lambda: registry.get("p").status is not None)
        third = await broker.link_for(registry.get("p"), registry.get("d"))
        assert third not in ("", first, second) and broker.num_opened == 3

    run_pair(scenario, p, d)
