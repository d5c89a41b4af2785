"""Prefill/decode disaggregation over real worker processes (CPU backend,
KV pushed over gRPC, or over the coordinator-brokered pair link, here its
tcp transport, the protocol NCCL links run on GPUs): a cluster of one prefill and one decode group (and
one whose prefill group is tp=2 over MPI, the decode group tp=1, so KV
heads are gathered and re-sharded) streams, for 64 concurrent mixed
requests, exactly the completions of offline single-rank generation (what
a mixed group serves, test_serving); prompts with at least
`min_remote_prefill_tokens` uncached tokens are prefilled remotely, the
others locally, counted. 200 requests cancelled at random moments of the
hand-off leave both groups with every block free, nothing reserved and
every invariant holding; a prefill worker killed mid-run leaves no request
hung: they fall back to prefill on the decode group, with the same output.
Plus in-process checks of the engine's export/commit, the chunking, and a
reservation nobody fills expiring with its blocks freed."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import grpc
import numpy as np
import pytest
import yaml

from engine_fixtures import export_then_commit, make_engine, save_tiny_llama, tiny_local
from mpi_launch import needs_mpi
from serving_fixtures import PASSAGE, PromptCase, collect, running_cluster
from shardline.proto import worker_pb2
from shardline.worker.engine import EngineConfig, LLMEngine
from shardline.worker.kv_transfer import KVAssembler, KVExport, kv_chunks
from shardline.worker.offline import load_local
from shardline.worker.sampling_params import SamplingParams
from test_serving_tp import tiny_model_with_tokenizer

torch = pytest.importorskip("torch")
# float64, as in test_serving_tp: tokens are compared with an offline engine's.
ENGINE = {"backend": "numpy", "dtype": "float64", "num_kv_blocks": 384, "max_num_seqs": 64,
          "block_size_tokens": 16}
MIN_REMOTE_TOKENS = 40


def cases(count: int, seed: int) -> list[PromptCase]:
    """Prompts of 4 to 90 words, each opening with its own number (no shared prefix
    blocks), greedy and seeded sampling alternating."""
    rng, words = random.Random(seed), PASSAGE.split()
    out = []
    for i in range(count):
        start, length = rng.randrange(len(words)), rng.randint(4, 90)
        text = f"Note {seed}-{i}: " + " ".join((words * 2)[start:start + length])
        out.append(PromptCase(text, rng.randint(2, 8), 0.0 if i % 2 == 0 else 0.8, seed + i, ignore_eos=True))
    return out


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return tiny_model_with_tokenizer(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def offline(model_folder):
    local = load_local(str(model_folder), backend="numpy", dtype=ENGINE["dtype"], show_progress=False)
    return LLMEngine(EngineConfig(**ENGINE), local)


def write_config(folder, model, prefill_tp: int = 1, timeout_s: float = 20.0, transport: str = "grpc",
                 engine: dict = ENGINE, devices: tuple[list[int], list[int]] = ([], [])):
    """One prefill and one decode group (`devices`: their GPUs, for CUDA engines)."""
    data = {"model": str(model), "served_model_name": "tiny", "engine": engine,
            "coordinator": {"host": "127.0.0.1", "port": 0, "heartbeat_interval_s": 0.25,
                            "heartbeat_timeout_s": 2.0, "startup_timeout_s": 300,
                            "limits": {"max_in_flight": 256},
                            "disaggregation": {"min_remote_prefill_tokens": MIN_REMOTE_TOKENS,
                                               "max_prefill_in_flight": 64, "prefill_timeout_s": timeout_s,
                                               "transport": transport}},
            # The prefill group computes 32 tokens a step: long prompts leave in pieces, each
            # pushed while the next computes.
            "groups": [{"name": "prefill", "role": "prefill", "tp": prefill_tp, "devices": devices[0],
                        "engine": {"max_num_batched_tokens": 32}},
                       {"name": "decode", "role": "decode", "devices": devices[1]}]}
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def references(engine: LLMEngine, batch: list[PromptCase]) -> list[list[int]]:
    return [c.token_ids for c in engine.generate([c.text for c in batch], [c.params() for c in batch])]


async def worker_status(served, name: str) -> worker_pb2.WorkerStatus:
    stub = served.cluster.registry.get(name).stub
    return await stub.GetStatus(worker_pb2.WorkerStatusRequest(check_integrity=True))


async def wait_idle(served, names, timeout_s: float = 30.0) -> dict:
    """Each group's status once nothing runs, waits or is reserved and every block is free."""
    deadline_s = time.monotonic() + timeout_s
    while True:
        statuses = {n: await worker_status(served, n) for n in names}
        idle = all(s.num_running == s.num_waiting == s.num_reserved == 0 and s.num_free_kv_blocks == s.num_kv_blocks
                   for s in statuses.values())
        if idle or time.monotonic() > deadline_s:
            return statuses
        await asyncio.sleep(0.1)


def assert_clean(statuses: dict) -> None:
    for name, s in statuses.items():
        assert s.integrity_error == "", f"{name}: {s.integrity_error}"
        assert (s.num_running, s.num_waiting, s.num_reserved) == (0, 0, 0), f"{name}: {s}"
        assert s.num_free_kv_blocks == s.num_kv_blocks, f"{name}: {s.num_free_kv_blocks} of {s.num_kv_blocks} free"


@needs_mpi
@pytest.mark.parametrize("prefill_tp,transport", [(1, "grpc"), (2, "grpc"), (1, "tcp"), (2, "tcp")])
def test_disaggregated_equals_offline_and_counts_remote_prefills(prefill_tp, transport, model_folder, offline,
                                                                  tmp_path):
    batch = cases(64, seed=100 * prefill_tp)
    expected = references(offline, batch)
    tokenizer = offline.tokenizer
    num_long = sum(len(tokenizer.encode(c.text)) >= MIN_REMOTE_TOKENS for c in batch)
    with running_cluster(write_config(tmp_path, model_folder, prefill_tp, transport=transport)) as served:
        stub = served.stub()

        async def run_all():
            return await asyncio.gather(*(collect(stub, c.request()) for c in batch))

        results = served.run(run_all(), 300)
        stats = served.run(served.stats()).disaggregation
        statuses = served.run(wait_idle(served, ["prefill", "decode"]))
        metric_bytes = {path: served.cluster.metrics.registry.get_sample_value(
            "shardline_kv_transfer_bytes_total", {"path": path}) or 0 for path in ("link", "stream")}
    for case, want, (responses, code, details) in zip(batch, expected, results):
        assert code == grpc.StatusCode.OK, details
        got = [t for r in responses for t in r.token_ids]
        assert got == want, f"{case.text!r}"
        assert {r.group for r in responses if r.group} == {"decode"}
    print(f"prefill tp={prefill_tp} over {transport}: {stats.remote_prefills} remote, {stats.local_prefills} local "
          f"of {len(batch)}, {stats.kv_transfer_bytes} KV bytes in {stats.kv_transfer_s:.3f} s")
    assert (stats.remote_prefills, stats.local_prefills, stats.fallbacks) == (num_long, len(batch) - num_long, 0)
    linked = transport != "grpc"
    assert (stats.kv_link_transfers, stats.kv_links_opened) == (num_long if linked else 0, int(linked))
    assert metric_bytes == {"link": stats.kv_transfer_bytes if linked else 0,
                            "stream": 0 if linked else stats.kv_transfer_bytes}
    assert 0 < num_long < len(batch)
    assert stats.kv_transfer_bytes > 0
    assert_clean(statuses)


@needs_mpi
@pytest.mark.parametrize("transport", ["grpc", "tcp"])
def test_cancelled_handoffs_leak_nothing_and_a_killed_prefill_group_hangs_nothing(transport, model_folder, offline,
                                                                                   tmp_path):
    rng = random.Random(int(np.random.SeedSequence().entropy % 2**31))
    long_cases = [c for c in cases(400, seed=7) if len(offline.tokenizer.encode(c.text)) >= MIN_REMOTE_TOKENS]
    storm, survivors = long_cases[:200], long_cases[200:248]
    assert len(survivors) == 48
    expected = references(offline, survivors)
    with running_cluster(write_config(tmp_path, model_folder, prefill_tp=1, timeout_s=10.0,
                                      transport=transport)) as served:
        stub = served.stub()

        async def cancel_at_random(case: PromptCase):
            call = stub.Generate(case.request())
            await asyncio.sleep(rng.uniform(0.0, 1.0))   # before, during or after its hand-off
            call.cancel()

        async def storm_then_settle():
            await asyncio.gather(*(cancel_at_random(c) for c in storm))
            return await wait_idle(served, ["prefill", "decode"])

        statuses = served.run(storm_then_settle(), 300)
        after_storm = served.run(served.stats()).disaggregation
        assert_clean(statuses)
        assert after_storm.remote_prefills + after_storm.local_prefills > 0
        assert after_storm.kv_link_transfers == (after_storm.remote_prefills if transport != "grpc" else 0)

        prefill_pid = served.cluster.launcher.processes["prefill"].process.pid

        async def kill_prefill_midway():
            calls = [asyncio.ensure_future(collect(stub, c.request(), timeout=120)) for c in survivors]
            while (await served.stats()).disaggregation.remote_prefills == after_storm.remote_prefills:
                await asyncio.sleep(0.005)   # the first hand-off of this batch is done: kill mid-run
            os.kill(prefill_pid, signal.SIGKILL)
            return await asyncio.gather(*calls)

        results = served.run(kill_prefill_midway(), 180)
        stats = served.run(served.stats()).disaggregation
        assert served.cluster.api.disagg.links.open_links() == {}   # dropped with the dead group
        decode_status = served.run(wait_idle(served, ["decode"]))
    for case, want, (responses, code, details) in zip(survivors, expected, results):
        assert code == grpc.StatusCode.OK, details
        assert [t for r in responses for t in r.token_ids] == want, f"{case.text!r}"
    print(f"after the storm: {after_storm}; after the kill: {stats}".replace("\n", " "))
    assert stats.remote_prefills > after_storm.remote_prefills
    assert stats.fallbacks + stats.local_prefills > after_storm.local_prefills   # after the kill
    assert_clean(decode_status)


def test_engine_export_then_commit_equals_local_generation(tmp_path):
    local = tiny_local(save_tiny_llama(tmp_path / "llama", int(np.random.SeedSequence().entropy % 2**31)))
    got, want, decode = export_then_commit(local, np.random.default_rng())
    assert got == want
    assert decode.block_manager.num_free_blocks == decode.num_kv_blocks


def test_assembler_names_what_does_not_fit():
    export = KVExport(4, np.zeros((2, 6, 3, 8), np.float32), np.zeros((2, 6, 3, 8), np.float32))
    chunks = list(kv_chunks("r", export, 1, None))
    with pytest.raises(ValueError, match="dtype"):
        KVAssembler(4, 10, 2, 3, 8, np.float64).add(chunks[0])
    with pytest.raises(ValueError, match="start_token"):
        KVAssembler(5, 10, 2, 3, 8, np.float32).add(chunks[0])
    assembler = KVAssembler(4, 10, 2, 3, 8, np.float32)
    assembler.add(chunks[0])
    with pytest.raises(ValueError, match="never arrived"):
        assembler.check_complete()
    assert chunks[-1].commit and chunks[-1].first_token_id == 1


def test_a_reservation_nobody_fills_expires_and_frees_its_blocks(tmp_path):
    local = tiny_local(save_tiny_llama(tmp_path / "llama", int(np.random.SeedSequence().entropy % 2**31)))
    engine = make_engine(local, remote_kv_timeout_s=0.05)
    prompt = np.random.default_rng().integers(0, 100, 40).tolist()
    assert engine.reserve_remote_kv("r", prompt, SamplingParams(max_tokens=4)) == 0
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks - 3
    engine.scheduler.check_integrity()
    time.sleep(0.1)
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("r", "error")]
    assert "expired" in outputs[0].error
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks and not engine.has_unfinished()
    with pytest.raises(KeyError, match="no KV reservation"):
        engine.commit_remote_kv("r", 0, np.zeros((2, 40, 2, 16)), np.zeros((2, 40, 2, 16)), 1)


def test_reserved_requests_hold_running_seats(tmp_path):
    """Waiting requests are not admitted into seats that reservations will take."""
    local = tiny_local(save_tiny_llama(tmp_path / "llama", int(np.random.SeedSequence().entropy % 2**31)))
    engine = make_engine(local, max_num_seqs=4)
    rng = np.random.default_rng()
    for rid in ("r0", "r1"):
        assert engine.reserve_remote_kv(rid, rng.integers(0, 100, 20).tolist(), SamplingParams(max_tokens=3)) == 0
    for i in range(4):
        engine.add_request(f"w{i}", rng.integers(0, 100, 10).tolist(), SamplingParams(max_tokens=3))
    engine.step()
    assert engine.scheduler.stats()["num_running"] == 2
    kv = np.zeros((local.model.config.num_layers, 20, local.model.config.num_kv_heads, local.model.config.head_dim))
    for rid in ("r0", "r1"):
        engine.commit_remote_kv(rid, 0, kv, kv, 1)
    while engine.has_unfinished():
        engine.step()
        engine.scheduler.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
