"""A real local cluster: the coordinator in this process (its own event loop
on a thread), two worker processes serving the embedded SmolLM2 on the
NumPy backend, every port picked free, bearer token always and TLS when a
certificate can be made. Outputs are checked against LLMEngine run
offline in this process with the same params; the module's cluster is
shared by the tests, the SIGKILL test runs last, and every process is gone
at the end."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from serving_experiments import cancel_experiment, kill_experiment, routing_experiment
from serving_fixtures import (AUTH, REPLICAS, Reference, Served, collect, offline_references,
                              prompts_of_mixed_lengths, sampling, served_cluster, write_cluster_config)
from shardline.proto import shardline_pb2 as pb
from shardline.proto import shardline_pb2_grpc
from tls_cert import NO_CERT_REASON

pytestmark = pytest.mark.timeout(300)

CONCURRENT = prompts_of_mixed_lengths(64)
KILLED = prompts_of_mixed_lengths(16, seed_base=500, max_tokens=(12, 16))


@pytest.fixture(scope="module")
def references() -> dict[str, Reference]:
    return offline_references(CONCURRENT + KILLED)


@pytest.fixture(scope="module")
def served(tmp_path_factory, references):
    with served_cluster(tmp_path_factory.mktemp("serving")) as cluster:
        yield cluster


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return children


def test_serve_runs_until_sigterm_and_leaves_no_process(tmp_path):
    """`serve` (behind `shardline serve -c FILE`): ready file, one request, SIGTERM, exit 0, no worker left.
    First in the module, so it runs before the shared cluster starts."""
    config, ready = write_cluster_config(tmp_path, cert=None, replicas=1, with_auth=False), tmp_path / "ready"
    code = "import sys; from shardline.coordinator.server import serve; sys.exit(serve(sys.argv[1], sys.argv[2]))"
    process = subprocess.Popen([sys.executable, "-c", code, str(config), str(ready)], stderr=subprocess.PIPE)
    try:
        deadline_s = time.monotonic() + 180
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline_s:
            time.sleep(0.1)
        assert ready.exists(), process.stderr.read().decode()[-3000:] if process.poll() is not None else "timeout"
        workers = _children(process.pid)
        assert len(workers) == 1
        with grpc.insecure_channel(ready.read_text().strip()) as channel:
            stub = shardline_pb2_grpc.ShardlineStub(channel)
            responses = list(stub.Generate(sampling("Hello", 3).request(), timeout=60))
        assert responses[-1].usage.completion_tokens > 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        time.sleep(0.2)
        assert not [w for w in workers if Path(f"/proc/{w}").exists()]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def assert_matches(result, reference: Reference) -> None:
    responses, code, details = result
    assert code == grpc.StatusCode.OK, details
    assert [t for r in responses for t in r.token_ids] == reference.token_ids
    assert "".join(r.text for r in responses) == reference.text
    assert responses[-1].finish_reason == reference.finish_reason
    assert responses[-1].usage.completion_tokens == len(reference.token_ids)


def test_health_reflection_and_auth(served: Served):
    assert served.run(served.health()) == "SERVING"
    assert "shardline.v1.Shardline" in served.run(served.reflected_services())
    _, code, details = served.run(collect(served.stub(), pb.GenerateRequest(prompt="hi"), metadata=()))
    assert code == grpc.StatusCode.UNAUTHENTICATED and details.startswith("authorization")
    async def list_models():
        return await served.stub().ListModels(pb.ListModelsRequest(), metadata=AUTH)
    models = served.run(list_models())
    assert [(m.name, m.num_groups) for m in models.models] == [("smollm2", REPLICAS)]


def test_tls(served: Served):
    if not served.tls:
        pytest.skip(NO_CERT_REASON)
    async def plaintext():
        async with grpc.aio.insecure_channel(served.cluster.address) as channel:
            return await collect(shardline_pb2_grpc.ShardlineStub(channel), sampling("Hi", 2).request())
    _, code, _ = served.run(plaintext())
    assert code == grpc.StatusCode.UNAVAILABLE  # the port speaks TLS only; the served channel does TLS


def test_64_concurrent_streams_equal_offline_generation(served: Served, references):
    async def burst():
        stub = served.stub()
        return await asyncio.gather(*(collect(stub, p.request()) for p in CONCURRENT))
    started = time.monotonic()
    results = served.run(burst(), timeout_s=200)
    print(f"\n64 streams in {time.monotonic() - started:.1f} s")
    for prompt, result in zip(CONCURRENT, results):
        assert_matches(result, references[prompt.key])
    groups = [r[0][0].group for r in results]
    assert {g: groups.count(g) > 0 for g in served.group_names} == {g: True for g in served.group_names}


def test_kv_aware_routing_follows_shared_prefixes(served: Served):
    """Load bound: kv_aware sends a request to group A over B only when
    overlap_weight * uncached_A + active_A <= overlap_weight * uncached_B + active_B, so the group
    chosen never carries more than overlap_weight * prompt_blocks (one request's worth of blocks)
    of in-flight KV beyond the other; a burst on one hot prefix therefore splits about evenly."""
    report = served.run(routing_experiment(served), timeout_s=120)
    print(f"\nKV routing: {report}")
    assert report["sequential_home_share"] == 1.0   # with no load, a shared prefix always goes home
    assert report["sequential_router_hit_rate"] > 0.8
    # Under a burst the cost trades cache for load: no group takes more than 3/4 of it.
    assert max(report["burst_split"].values()) <= 0.75 * report["burst_size"]


def test_cancel_and_abort_free_the_blocks(served: Served):
    report = served.run(cancel_experiment(served), timeout_s=60)
    assert report["held_while_streaming"] > 0
    assert report["free_after_cancel"] == report["num_kv_blocks"]
    assert report["abort_finish_reason"] == pb.FINISH_REASON_ABORT
    assert report["after"] == grpc.StatusCode.OK


MALFORMED = [
    (pb.GenerateRequest(prompt=""), "prompt"),
    (pb.GenerateRequest(prompt="x", model="gpt-9"), "model"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingOptions(max_tokens=0)), "sampling.max_tokens"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingOptions(max_tokens=10**6)), "sampling.max_tokens"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingOptions(top_p=1.5)), "sampling.top_p"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingOptions(temperature=-0.5)), "sampling.temperature"),
    (pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[7] * 9000)), "prompt"),
    (pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[60000])), "prompt_token_ids"),  # checked by the worker
]


def test_malformed_requests_are_refused_and_serving_goes_on(served: Served):
    stub = served.stub()
    for request, field in MALFORMED:
        _, code, details = served.run(collect(stub, request))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field), (field, code, details)
    _, code, details = served.run(served.raw_generate(b"\x1a\x03\xe2\x82\x28"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details == "prompt: not valid UTF-8"
    _, code, _ = served.run(collect(stub, pb.GenerateRequest(prompt="a" * (2 << 20))))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    responses, code, _ = served.run(collect(stub, sampling("Hello", 3).request()))
    assert code == grpc.StatusCode.OK and responses[-1].usage.completion_tokens > 0


def test_sigkill_a_worker_during_16_streams(served: Served, references):
    """Every stream completes with the offline output (resumed on the other replica) or ends
    UNAVAILABLE within 10 s; new requests succeed."""
    report = served.run(kill_experiment(served, KILLED), timeout_s=120)
    print(f"\nSIGKILL: {report['summary']}")
    for prompt, (result, ended_s) in zip(KILLED, report["results"]):
        if result[1] == grpc.StatusCode.UNAVAILABLE:
            assert ended_s < 10.0
        else:
            assert_matches(result, references[prompt.key])
    assert report["num_resumed"] > 0
    assert report["after"] == grpc.StatusCode.OK
