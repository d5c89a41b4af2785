"""Coordinator health, failover and security against in-process fake
engine groups: a group that dies mid-stream has its requests resumed on
the other one with identical tokens; a silent group turns unhealthy; a
group whose stream broke registers again; KV-aware routing follows the
prefix; health, reflection, bearer token and TLS."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from coordinator_fakes import collect, expected_tokens, request, run, shared_tokenizer, tokens_of
from tls_cert import NO_CERT_REASON, self_signed_cert
from shardline.proto import shardline_pb2 as pb
from shardline.proto import shardline_pb2_grpc


@pytest.fixture(scope="module")
def tokenizer():
    return shared_tokenizer()


def test_killed_group_streams_resume_on_the_other(tmp_path, tokenizer):
    async def scenario(fake):
        prompts = [list(range(3 + i, 30 + i)) for i in range(8)]
        tasks = [asyncio.ensure_future(collect(fake.stub, request(p, max_tokens=30, seed=i)))
                 for i, p in enumerate(prompts)]
        await asyncio.sleep(0.15)  # every stream has some tokens out
        assert fake.groups[0].worker.active and fake.groups[1].worker.active
        await fake.groups[0].kill()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        for i, (responses, code, details) in enumerate(results):
            assert code == grpc.StatusCode.OK, details
            assert tokens_of(responses) == expected_tokens(prompts[i], 30, i)
            assert responses[-1].usage.completion_tokens == 30
        switched = [r for r, _, _ in results if [x.group for x in r if x.group] == ["w-0", "w-1"]]
        assert switched  # some streams moved; each said so once
        resumed = [q for q in fake.groups[1].worker.requests if q.output_token_ids]
        assert resumed and all(q.request_id.endswith(".resume1") for q in resumed)
        assert not fake.cluster.registry.get("w-0").healthy
        responses, code, _ = await collect(fake.stub, request(max_tokens=3))
        assert code == grpc.StatusCode.OK and responses[0].group == "w-1"
    run(tmp_path, tokenizer, scenario)


def test_broken_stream_marks_unhealthy_until_the_group_registers_again(tmp_path, tokenizer):
    async def scenario(fake):
        fake.groups[0].worker.fail_after_tokens = 3
        fake.groups[1].worker.fail_after_tokens = 3
        prompt = list(range(50, 90))
        responses, code, details = await collect(fake.stub, request(prompt, max_tokens=8))
        # Both groups fell over once; the second failure had the first group back already, or not:
        # either way the request finished with the right tokens or UNAVAILABLE, never a hang.
        if code == grpc.StatusCode.OK:
            assert tokens_of(responses) == expected_tokens(prompt, 8, 7)
        else:
            assert code == grpc.StatusCode.UNAVAILABLE and "no healthy engine group" in details
        for _ in range(50):  # heartbeats answer known=False; the workers register again
            if all(g.healthy for g in fake.cluster.registry.groups()):
                break
            await asyncio.sleep(0.05)
        assert all(g.healthy for g in fake.cluster.registry.groups())
        responses, code, _ = await collect(fake.stub, request(prompt, max_tokens=8))
        assert code == grpc.StatusCode.OK and tokens_of(responses) == expected_tokens(prompt, 8, 7)
    run(tmp_path, tokenizer, scenario)


def test_no_group_left_is_unavailable_quickly(tmp_path, tokenizer):
    async def scenario(fake):
        task = asyncio.ensure_future(collect(fake.stub, request(max_tokens=200)))
        await asyncio.sleep(0.1)
        for group in fake.groups:
            await group.kill()
        _, code, details = await asyncio.wait_for(task, 10)
        assert code == grpc.StatusCode.UNAVAILABLE and "no healthy engine group" in details
        _, code, _ = await asyncio.wait_for(collect(fake.stub, request()), 10)
        assert code == grpc.StatusCode.UNAVAILABLE
    run(tmp_path, tokenizer, scenario)


def test_silent_group_turns_unhealthy_and_stalled_streams_move(tmp_path, tokenizer):
    async def scenario(fake):
        fake.groups[0].link.cancel()  # alive but silent: no more heartbeats
        await asyncio.sleep(1.0)      # heartbeat_timeout_s = 1
        for _ in range(100):          # the registry notices within its check interval
            stats = await fake.stub.GetStats(pb.GetStatsRequest())
            if not stats.groups[0].healthy:
                break
            await asyncio.sleep(0.05)
        assert {g.name: g.healthy for g in stats.groups} == {"w-0": False, "w-1": True}
        for _ in range(4):
            responses, code, _ = await collect(fake.stub, request(max_tokens=2))
            assert code == grpc.StatusCode.OK and responses[0].group == "w-1"
    run(tmp_path, tokenizer, scenario, coordinator={"heartbeat_timeout_s": 1.0})


def test_kv_aware_routing_follows_the_prefix(tmp_path, tokenizer):
    async def scenario(fake):
        shared = list(range(1000, 1000 + 16 * 8))  # 8 blocks
        first, _, _ = await collect(fake.stub, request(shared + [1], max_tokens=2))
        home = first[0].group
        await asyncio.sleep(0.1)  # the KV events reach the index
        groups = []
        for i in range(6):
            responses, _, _ = await collect(fake.stub, request(shared + [2 + i] * 20, max_tokens=2))
            groups.append(responses[0].group)
        assert groups == [home] * 6
        stats = await fake.stub.GetStats(pb.GetStatsRequest())
        assert stats.router_prefix_hit_rate > 0.5
    run(tmp_path, tokenizer, scenario)


def test_health_and_reflection(tmp_path, tokenizer):
    async def scenario(fake):
        health = health_pb2_grpc.HealthStub(fake.channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="shardline.v1.Shardline"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(fake.channel)
        call = reflection.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        answer = await call.read()
        await call.done_writing()
        names = {s.name for s in answer.list_services_response.service}
        assert {"shardline.v1.Shardline", "shardline.worker.v1.Coordinator", "grpc.health.v1.Health"} <= names
    run(tmp_path, tokenizer, scenario)


def test_bearer_token(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("SHARDLINE_TEST_TOKEN", "s3cret")

    async def scenario(fake):
        _, code, details = await collect(fake.stub, request())
        assert code == grpc.StatusCode.UNAUTHENTICATED and details.startswith("authorization")
        _, code, _ = await collect(fake.stub, request(), metadata=(("authorization", "Bearer wrong"),))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fake.stub.GetStats(pb.GetStatsRequest())
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        responses, code, _ = await collect(fake.stub, request(), metadata=(("authorization", "Bearer s3cret"),))
        assert code == grpc.StatusCode.OK and len(tokens_of(responses)) == 4
    run(tmp_path, tokenizer, scenario, coordinator={"auth_token_env": "SHARDLINE_TEST_TOKEN"})


def test_tls(tmp_path, tokenizer):
    made = self_signed_cert(tmp_path)
    if made is None:
        pytest.skip(NO_CERT_REASON)
    cert, key = made

    async def scenario(fake):
        assert fake.cluster.control_address != fake.cluster.address  # workers register in plain gRPC
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        async with grpc.aio.secure_channel(fake.cluster.address, credentials) as channel:
            responses, code, _ = await collect(shardline_pb2_grpc.ShardlineStub(channel), request())
        assert code == grpc.StatusCode.OK and len(tokens_of(responses)) == 4
        _, code, _ = await collect(fake.stub, request())  # plaintext to a TLS port
        assert code == grpc.StatusCode.UNAVAILABLE
    run(tmp_path, tokenizer, scenario, coordinator={"tls": {"cert_file": str(cert), "key_file": os.path.basename(key)}})


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
