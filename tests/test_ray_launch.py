"""The `ray` launcher on a real local Ray cluster (fake GPU resources, so
placement groups are exercised): two groups, one of them tp=2 (two MPI
ranks, CPU backend), serve gRPC Generate end to end; killing the tp=2
group's actor makes Ray restart it, the group registers again, and the
other group serves all along; stopping removes the placement groups and
leaves no rank behind."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import tempfile
import time

import grpc
import pytest
import yaml

from mpi_launch import needs_mpi
from process_scan import processes_with, wait_until_gone
from serving_fixtures import collect
from shardline.coordinator.cluster_config import load_cluster_config
from shardline.coordinator.launcher import LaunchError
from shardline.coordinator.server import start_cluster
from shardline.models.tiny_checkpoint import write_tiny_llama
from shardline.proto import shardline_pb2 as pb
from shardline.proto import shardline_pb2_grpc

ray = pytest.importorskip("ray")
pytestmark = needs_mpi
ENGINE = {"backend": "numpy", "num_kv_blocks": 64, "max_num_seqs": 8, "block_size_tokens": 16}


@pytest.fixture(scope="module")
def local_ray():
    # Short: Ray puts unix sockets under it (limit ~107 characters), which pytest's tmp_path would exceed.
    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")
    previous = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=8, num_gpus=4, _temp_dir=temp_dir, include_dashboard=False, namespace="shardline-test")
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        os.environ.pop("RAY_AUTH_MODE") if previous is None else os.environ.update(RAY_AUTH_MODE=previous)


def write_config(folder, model, groups=(("solo", 1), ("pair", 2)), startup_timeout_s: float = 180,
                 max_restarts: int = 2, group_engine: dict | None = None) -> str:
    data = {"model": str(model), "served_model_name": "tiny", "launcher": "ray", "engine": ENGINE,
            "coordinator": {"host": "127.0.0.1", "port": 0, "heartbeat_interval_s": 0.25,
                            "heartbeat_timeout_s": 3.0, "startup_timeout_s": startup_timeout_s},
            "ray": {"cpus_per_rank": 1, "gpus_per_rank": 1, "max_restarts": max_restarts,
                    "worker_host": "127.0.0.1"},
            "groups": [{"name": name, "tp": tp, "engine": group_engine or {}} for name, tp in groups]}
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def request(i: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=f"The lighthouse keeper number {i}",
                              sampling=pb.SamplingOptions(max_tokens=6, temperature=0.0, ignore_eos=True))


async def generate_ok(stub, i: int) -> str:
    responses, code, details = await collect(stub, request(i), metadata=())
    assert code == grpc.StatusCode.OK, details
    assert sum(len(r.token_ids) for r in responses) == 6
    return "".join(r.text for r in responses)


async def routed(stub) -> dict[str, int]:
    stats = await stub.GetStats(pb.GetStatsRequest())
    return {g.name: g.requests_routed for g in stats.groups}


def placement_states() -> list[str]:
    return [entry["state"] for entry in ray.util.placement_group_table().values()
            if entry["name"].startswith("shardline-")]


async def restart_while_serving(cluster, stub) -> None:
    """Kill the tp=2 group's actor; the solo group answers every request until the pair is back."""
    old_address = cluster.registry.get("pair").address
    ray.kill(cluster.launcher.actors["pair"], no_restart=False)
    deadline_s, i, saw_unhealthy = time.monotonic() + 120, 100, False
    while True:
        await generate_ok(stub, i)
        i += 1
        state = cluster.registry.get("pair")
        saw_unhealthy = saw_unhealthy or not state.healthy
        if saw_unhealthy and state.healthy and state.address != old_address and state.status is not None:
            return
        assert time.monotonic() < deadline_s, f"pair did not come back: {state.unhealthy_reason}"
        await asyncio.sleep(0.1)


def test_ray_serves_two_groups_and_restarts_a_killed_one(tmp_path, local_ray):
    config_path = write_config(tmp_path, write_tiny_llama(tmp_path / "tiny"))

    async def scenario():
        cluster = await start_cluster(load_cluster_config(config_path), config_path)
        marker = f"--coordinator {cluster.control_address}"
        try:
            assert sorted(placement_states()) == ["CREATED", "CREATED"]
            assert len(processes_with("shardline.worker", marker)) >= 3  # solo + 2 ranks (+ mpiexec)
            async with grpc.aio.insecure_channel(cluster.address) as channel:
                stub = shardline_pb2_grpc.ShardlineStub(channel)
                texts = await asyncio.gather(*(generate_ok(stub, i) for i in range(8)))
                assert len(set(texts)) > 1 and all(n > 0 for n in (await routed(stub)).values())
                old_pair = processes_with("shardline.worker", marker, "--group pair")
                await restart_while_serving(cluster, stub)
                assert not set(old_pair) & set(processes_with("shardline.worker", marker, "--group pair"))
                before = (await routed(stub))["pair"]
                await asyncio.gather(*(generate_ok(stub, i) for i in range(200, 208)))
                assert (await routed(stub))["pair"] > before  # the restarted group serves again
        finally:
            await cluster.stop()
        return marker

    marker = asyncio.run(asyncio.wait_for(scenario(), 300))
    assert wait_until_gone("shardline.worker", marker) == []
    assert all(state == "REMOVED" for state in placement_states())


def start_failing(config_path: str) -> str:
    async def scenario():
        with pytest.raises(LaunchError) as err:
            await start_cluster(load_cluster_config(config_path), config_path)
        return str(err.value)
    return asyncio.run(asyncio.wait_for(scenario(), 120))


def test_ray_group_not_registering_in_time_is_named(tmp_path, local_ray):
    # The embedded model takes seconds to load: longer than this startup timeout.
    config_path = write_config(tmp_path, "default", groups=(("slow", 1),), startup_timeout_s=1.0)
    message = start_failing(config_path)
    assert "group(s) slow did not register within 1 s" in message and "--- slow stderr ---" in message
    assert wait_until_gone("shardline.worker", "--group slow") == []
    assert all(state == "REMOVED" for state in placement_states())


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="needs a machine without cupy")
def test_ray_group_failing_past_its_restarts_is_named(tmp_path, local_ray):
    # No cupy here: the group's worker exits at start, its actor with it, and Ray gives up.
    config_path = write_config(tmp_path, write_tiny_llama(tmp_path / "tiny"), groups=(("broken", 1),),
                               max_restarts=0, group_engine={"backend": "cuda"})
    message = start_failing(config_path)
    assert "group broken did not come up: its Ray actor died and will not restart" in message
    assert wait_until_gone("shardline.worker", "--group broken") == []
    assert all(state == "REMOVED" for state in placement_states())
