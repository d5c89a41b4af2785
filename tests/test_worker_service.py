"""The worker process end to end: `python -m shardline.worker` against a real
control-plane server run here, talked to over gRPC.

It registers and heartbeats (and registers again when forgotten), reports
SERVING, streams the same tokens and text as offline generation, frees a
cancelled request's blocks, rejects bad requests with INVALID_ARGUMENT naming
the field, streams KV events (snapshot first), resumes after streamed tokens,
and refuses bad handoff input (Prefill, PushKV, an expired reservation).
The process's lifecycle is in test_worker_service_lifecycle.py.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardline.models.default_model import default_model_path
from shardline.proto import shardline_pb2, worker_pb2, worker_pb2_grpc
from shardline.worker.block_hash import block_hashes
from shardline.worker.engine import EngineConfig, LLMEngine
from shardline.worker.offline import load_local
from shardline.worker.proto_convert import sampling_params_to_proto
from shardline.worker.sampling_params import SamplingParams

NUM_KV_BLOCKS, BLOCK_SIZE_TOKENS, HEARTBEAT_INTERVAL_S = 256, 16, 0.2
START_TIMEOUT_S = 60.0
CONFIG = f"""
model: default
served_model_name: test-model
coordinator: {{heartbeat_interval_s: {HEARTBEAT_INTERVAL_S}, heartbeat_timeout_s: 2.0,
              disaggregation: {{prefill_timeout_s: 0.1}}}}
engine: {{backend: numpy, num_kv_blocks: {NUM_KV_BLOCKS}, block_size_tokens: {BLOCK_SIZE_TOKENS}}}
groups: [{{name: g0}}, {{name: g-term}}, {{name: g-orphan}}, {{name: g-tp, tp: 2}},
         {{name: g-short, engine: {{remote_kv_timeout_s: 0.3}}}}]
"""
PROMPT = "The three primary colors are"


class ControlPlane(worker_pb2_grpc.CoordinatorServicer):
    """The coordinator's side of Register/Heartbeat, recording every call."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.registrations: list[worker_pb2.RegisterRequest] = []
        self.heartbeats: list[worker_pb2.HeartbeatRequest] = []
        self._forgotten: set[str] = set()

    def Register(self, request, context):
        with self._cond:
            self.registrations.append(request)
            self._forgotten.discard(request.group)
            self._cond.notify_all()
        return worker_pb2.RegisterResponse(heartbeat_interval_s=HEARTBEAT_INTERVAL_S)

    def Heartbeat(self, request, context):
        with self._cond:
            self.heartbeats.append(request)
            self._cond.notify_all()
            return worker_pb2.HeartbeatResponse(known=request.group not in self._forgotten)

    def forget(self, group: str) -> None:
        with self._cond:
            self._forgotten.add(group)

    def wait_for(self, predicate, timeout_s: float, what: str):
        with self._cond:
            if not self._cond.wait_for(predicate, timeout_s):
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
            return predicate()

    def registrations_of(self, group: str) -> list[worker_pb2.RegisterRequest]:
        return [r for r in self.registrations if r.group == group]


@pytest.fixture(scope="module")
def control():
    servicer = ControlPlane()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    worker_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)
    servicer.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    yield servicer
    server.stop(None)


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("worker") / "cluster.yaml"
    path.write_text(CONFIG)
    return path


def worker_command(config_path: Path, group: str, control: ControlPlane) -> list[str]:
    return [sys.executable, "-m", "shardline.worker", "--config", str(config_path), "--group", group,
            "--coordinator", control.address, "--parent-poll-s", "0.1"]


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(10)


def wait_registered(control: ControlPlane, group: str, log_path: Path) -> str:
    try:
        return control.wait_for(lambda: control.registrations_of(group), START_TIMEOUT_S,
                                f"{group} to register")[0].address
    except AssertionError as err:
        raise AssertionError(f"{err}\n{log_path.read_text()[-3000:]}") from None


def launch_worker(request, config_path: Path, group: str, control: ControlPlane) -> subprocess.Popen:
    with open(config_path.parent / f"{group}.err", "wb") as log:
        process = subprocess.Popen(worker_command(config_path, group, control), stderr=log,
                                   stdin=subprocess.DEVNULL)
    request.addfinalizer(lambda: stop_process(process))
    return process


@pytest.fixture(scope="module")
def g0_process(request, config_path, control) -> subprocess.Popen:
    return launch_worker(request, config_path, "g0", control)


@pytest.fixture(scope="module")
def reference(g0_process):
    """An in-process engine, loaded while the worker loads its own copy."""
    local = load_local(default_model_path(), backend="numpy", show_progress=False)
    return LLMEngine(EngineConfig(num_kv_blocks=NUM_KV_BLOCKS, block_size_tokens=BLOCK_SIZE_TOKENS), local)


@pytest.fixture(scope="module")
def worker(request, config_path, control, g0_process, reference):
    """The shared worker of group g0: (address, Worker stub, channel)."""
    address = wait_registered(control, "g0", config_path.parent / "g0.err")
    channel = grpc.insecure_channel(address)
    request.addfinalizer(channel.close)
    return address, worker_pb2_grpc.WorkerStub(channel), channel


def generate_request(request_id: str, prompt_ids, params: SamplingParams, output_token_ids=()):
    return worker_pb2.WorkerGenerateRequest(request_id=request_id, prompt_token_ids=prompt_ids,
                                            output_token_ids=output_token_ids,
                                            sampling=sampling_params_to_proto(params))


def collect(responses) -> tuple[list[int], list[str], list]:
    responses = list(responses)
    return [t for r in responses for t in r.token_ids], [r.text for r in responses], responses


def wait_idle(stub, timeout_s: float = 20.0) -> worker_pb2.WorkerStatus:
    deadline_s = time.monotonic() + timeout_s
    while True:
        status = stub.GetStatus(worker_pb2.WorkerStatusRequest(), timeout=5)
        if status.num_running == 0 and status.num_free_kv_blocks == status.num_kv_blocks:
            return status
        assert time.monotonic() < deadline_s, f"the worker did not free its blocks: {status}"
        time.sleep(0.05)


def test_registers_heartbeats_and_registers_again_when_forgotten(worker, control):
    address, _, _ = worker
    registration = control.registrations_of("g0")[0]
    assert (registration.role, registration.model, registration.tp, registration.pp) == ("mixed", "test-model", 1, 1)
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")
    beats = control.wait_for(lambda: [h for h in control.heartbeats if h.group == "g0"][2:], 10, "heartbeats")
    status = beats[-1].status
    assert (status.group, status.model, status.num_kv_blocks) == ("g0", "test-model", NUM_KV_BLOCKS)
    assert (status.block_size_tokens, status.max_model_len) == (BLOCK_SIZE_TOKENS, 8192)
    num_registrations = len(control.registrations_of("g0"))
    control.forget("g0")
    control.wait_for(lambda: len(control.registrations_of("g0")) > num_registrations, 10, "a new Register")
    assert control.registrations_of("g0")[-1].address == address


def test_health_is_serving(worker):
    health = health_pb2_grpc.HealthStub(worker[2])
    for service in ("", "shardline.worker.v1.Worker"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=12, temperature=0.0, logprobs=2),
    SamplingParams(max_tokens=12, temperature=0.8, top_k=50, seed=7),
], ids=["greedy", "seeded"])
def test_generate_streams_what_offline_generation_gives(worker, reference, params):
    _, stub, _ = worker
    ids = reference.tokenizer.encode(PROMPT)
    tokens, texts, responses = collect(stub.Generate(generate_request(f"gen-{params.seed}", ids, params), timeout=60))
    offline = reference.generate([ids], params)[0]
    assert tokens == offline.token_ids and len(tokens) > 1
    assert "".join(texts) == offline.text == reference.tokenizer.decode(tokens)
    reasons = [r.finish_reason for r in responses]
    assert reasons[-1] == shardline_pb2.FINISH_REASON_LENGTH
    assert set(reasons[:-1]) == {shardline_pb2.FINISH_REASON_UNSPECIFIED}
    assert all(r.num_prompt_tokens == len(ids) for r in responses)
    logprobs = [lp for r in responses for lp in r.logprobs]
    assert [lp.token_id for lp in logprobs] == (tokens if params.logprobs else [])
    assert all(len(lp.top) == params.logprobs for lp in logprobs)


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_a_caller_that_goes_away_frees_its_blocks(worker, how):
    _, stub, _ = worker
    params = SamplingParams(max_tokens=3000, temperature=0.0, ignore_eos=True)
    # 3,000 tokens take minutes on CPU: the deadline always falls mid-stream.
    call = stub.Generate(generate_request(f"gone-{how}", list(range(100, 300)), params),
                         timeout=60 if how == "cancel" else 3.0)
    if how == "cancel":
        assert next(call).token_ids
        busy = stub.GetStatus(worker_pb2.WorkerStatusRequest(), timeout=5)
        assert busy.num_running == 1 and busy.num_free_kv_blocks < NUM_KV_BLOCKS
        call.cancel()
    with pytest.raises(grpc.RpcError) as err:
        for _ in call:
            pass
    expected = grpc.StatusCode.CANCELLED if how == "cancel" else grpc.StatusCode.DEADLINE_EXCEEDED
    assert err.value.code() == expected
    wait_idle(stub)


def test_abort_ends_the_stream_and_a_taken_id_is_refused(worker):
    _, stub, _ = worker
    params = SamplingParams(max_tokens=3000, temperature=0.0, ignore_eos=True)
    call = stub.Generate(generate_request("to-abort", [5, 6, 7], params), timeout=60)
    next(call)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(generate_request("to-abort", [8], params), timeout=10))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and "request_id" in err.value.details()
    assert stub.Abort(shardline_pb2.AbortRequest(request_id="to-abort"), timeout=5).found
    assert list(call)[-1].finish_reason == shardline_pb2.FINISH_REASON_ABORT
    assert not stub.Abort(shardline_pb2.AbortRequest(request_id="to-abort"), timeout=5).found
    wait_idle(stub)


@pytest.mark.parametrize("prompt_ids, sampling, output_ids, field", [
    ([1, 2, 3], {"top_p": 1.5}, [], "sampling.top_p"),
    ([1, 2, 3], {"max_tokens": 0}, [], "sampling.max_tokens"),
    ([1, 49152, 3], {}, [], "prompt_token_ids"),
    ([], {}, [], "prompt_token_ids"),
    ([1] * 4200, {"max_tokens": 4096}, [], "sampling.max_tokens"),
    ([1, 2, 3], {"max_tokens": 4}, [9, 9, 9, 9], "output_token_ids"),
    ([1] * 200, {"max_tokens": 4000}, [], "KV blocks"),   # fits max_model_len, never fits the pool
], ids=["top_p", "max_tokens", "vocab", "empty", "max_model_len", "resumed_too_long", "kv_pool"])
def test_bad_requests_are_invalid_arguments_naming_the_field(worker, prompt_ids, sampling, output_ids, field):
    _, stub, _ = worker
    request = worker_pb2.WorkerGenerateRequest(request_id="bad", prompt_token_ids=prompt_ids,
                                               output_token_ids=output_ids,
                                               sampling=shardline_pb2.SamplingOptions(**sampling))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    tokens, _, _ = collect(stub.Generate(generate_request("after-bad", [1, 2, 3], SamplingParams(
        max_tokens=2, temperature=0.0, ignore_eos=True)), timeout=10))
    assert len(tokens) == 2   # still serving
    wait_idle(stub)


def read_in_background(call) -> queue.Queue:
    batches: queue.Queue = queue.Queue()

    def pump() -> None:
        try:
            for batch in call:
                batches.put(batch)
        except grpc.RpcError:
            pass
    threading.Thread(target=pump, daemon=True).start()
    return batches


def test_kv_events_snapshot_then_stored_hashes_of_the_prompt(worker):
    _, stub, _ = worker
    prompt_ids = np.random.default_rng(3).integers(100, 40000, 100).tolist()
    expected = block_hashes(prompt_ids, BLOCK_SIZE_TOKENS)
    call = stub.StreamKVEvents(worker_pb2.KVEventsRequest(), timeout=60)
    batches = read_in_background(call)
    first = batches.get(timeout=10)
    assert first.snapshot and first.sequence_number == 0 and not set(expected) & set(first.snapshot_hashes)
    collect(stub.Generate(generate_request("kv", prompt_ids, SamplingParams(max_tokens=1)), timeout=30))
    stored, numbers = [], [0]
    while stored != expected:
        batch = batches.get(timeout=10)
        assert not batch.snapshot
        numbers.append(batch.sequence_number)
        stored += [h for e in batch.events if e.kind == worker_pb2.KVEvent.KIND_STORED for h in e.block_hashes]
        assert len(stored) <= len(expected), stored
    assert numbers == list(range(len(numbers)))
    call.cancel()
    again = next(iter(stub.StreamKVEvents(worker_pb2.KVEventsRequest(), timeout=10)))
    assert again.snapshot and set(expected) <= set(again.snapshot_hashes)


def test_resumed_request_continues_like_the_uninterrupted_one(worker, reference):
    _, stub, _ = worker
    ids = reference.tokenizer.encode("Once upon a time")
    params = SamplingParams(max_tokens=10, temperature=0.8, seed=11)
    tokens, texts, _ = collect(stub.Generate(generate_request("whole", ids, params), timeout=60))
    num_streamed = 5
    resumed, resumed_texts, responses = collect(stub.Generate(
        generate_request("resumed", ids, params, output_token_ids=tokens[:num_streamed]), timeout=60))
    assert resumed == tokens[num_streamed:]
    assert "".join(texts[:num_streamed] + resumed_texts) == "".join(texts)
    assert responses[-1].finish_reason == shardline_pb2.FINISH_REASON_LENGTH


def test_handoff_rpcs_refuse_bad_input_naming_the_field(worker):
    """Prefill and PushKV: bad fields are INVALID_ARGUMENT naming them, an unknown
    reservation NOT_FOUND, an unreachable decode group FAILED_PRECONDITION (not the
    prefill group's fault); a reservation
    holds its blocks until its caller goes away, and nothing leaks."""
    _, stub, _ = worker
    greedy = sampling_params_to_proto(SamplingParams(max_tokens=4, temperature=0.0))
    good = dict(request_id="p", prompt_token_ids=[1, 2, 3], sampling=greedy, decode_address="127.0.0.1:1",
                decode_request_id="d")
    for changes, field in [({"decode_address": ""}, "decode_address"), ({"num_skip_tokens": 3}, "num_skip_tokens"),
                           ({"prompt_token_ids": []}, "prompt_token_ids")]:
        with pytest.raises(grpc.RpcError) as err:
            stub.Prefill(worker_pb2.PrefillRequest(**{**good, **changes}), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    with pytest.raises(grpc.RpcError) as err:   # computed, then nobody to push to
        stub.Prefill(worker_pb2.PrefillRequest(**good), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "decode_address" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.PushKV(iter([worker_pb2.KVChunk(request_id="nobody", commit=True)]), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "request_id" in err.value.details()

    prompt = np.random.default_rng().integers(0, 49152, 40).tolist()
    call = stub.Generate(worker_pb2.WorkerGenerateRequest(request_id="r", prompt_token_ids=prompt, sampling=greedy,
                                                          remote_prefill=True), timeout=60)
    first = next(call)
    assert first.reservation.reserved and first.reservation.num_cached_tokens == 0
    bad_chunks = [
        ([worker_pb2.KVChunk(request_id="r", num_tokens=1, num_layers=1, dtype="float64")], "dtype"),
        ([worker_pb2.KVChunk(request_id="r", commit=True)], "commit"),
        ([worker_pb2.KVChunk(request_id="r", num_tokens=0, num_layers=1, dtype="float32"),
          worker_pb2.KVChunk(request_id="other", commit=True)], "request_id"),
    ]
    for chunks, field in bad_chunks:
        with pytest.raises(grpc.RpcError) as err:
            stub.PushKV(iter(chunks), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details(), field
    status = stub.GetStatus(worker_pb2.WorkerStatusRequest(check_integrity=True), timeout=10)
    assert status.num_reserved == 1 and status.integrity_error == ""
    call.cancel()
    assert wait_idle(stub).num_reserved == 0


def test_an_expired_reservation_ends_the_stream_aborted(request, config_path, control):
    """ABORTED (not INVALID_ARGUMENT): the coordinator then prefills it locally."""
    launch_worker(request, config_path, "g-short", control)
    address = wait_registered(control, "g-short", config_path.parent / "g-short.err")
    with grpc.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        greedy = sampling_params_to_proto(SamplingParams(max_tokens=4, temperature=0.0))
        call = stub.Generate(worker_pb2.WorkerGenerateRequest(
            request_id="late", prompt_token_ids=list(range(1, 41)), sampling=greedy, remote_prefill=True), timeout=30)
        assert next(call).reservation.reserved
        with pytest.raises(grpc.RpcError) as err:
            next(call)
        assert err.value.code() == grpc.StatusCode.ABORTED and "reservation" in err.value.details()
        assert wait_idle(stub).num_reserved == 0
