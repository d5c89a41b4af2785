"""The pair-link KV hand-off protocol (worker/kv_link.py), on its tcp
transport: the same protocol NCCL links run between GPUs.

In process: arrays round-trip exactly; a receive nobody feeds ends in
LinkBroken at its deadline; closing a link unblocks a waiting receive; bad
open arguments name the field. Against a real worker process (the test
plays the prefill leader, an in-process engine computing the prompt's KV):
OpenKVLink refuses bad fields; a transfer for a request with no reservation
is drained and NOT_FOUND while the link stays usable; a real transfer
commits and the worker streams exactly what one engine generates alone; a
header that does not fit the model is INVALID_ARGUMENT naming the field and
closes the worker's end; nothing stays reserved or leaks."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import grpc
import numpy as np
import pytest

from engine_fixtures import join_pieces
from shardline.kernels.backend import create_backend
from shardline.proto import worker_pb2
from shardline.worker.kv_link import KVLinks, LinkBroken, TcpLink
from shardline.worker.kv_transfer import commit_chunk, link_header
from shardline.worker.proto_convert import sampling_params_to_proto
from shardline.worker.sampling_params import SamplingParams
from test_worker_service import config_path, control, g0_process, reference, wait_idle, worker  # noqa: F401


def open_pair(timeout_s: float) -> tuple[KVLinks, KVLinks]:
    backend = create_backend("numpy")
    receiver, sender = KVLinks(backend, "127.0.0.1", timeout_s), KVLinks(backend, "127.0.0.1", timeout_s)

    async def both():
        unique_id = await receiver.open("L", "tcp", 1, b"")
        await sender.open("L", "tcp", 0, unique_id)

    asyncio.run(both())
    return receiver, sender


def test_arrays_round_trip_and_a_stuck_transfer_breaks_the_link():
    receiver, sender = open_pair(timeout_s=0.5)
    rng = np.random.default_rng()
    arrays = [rng.standard_normal((3, 17, 2, 8)).astype(np.float32), rng.integers(0, 1 << 16, (5, 4), np.uint16)]
    send_end, recv_end = sender.get("L").ready.result(), receiver.get("L").ready.result()
    sending = threading.Thread(target=lambda: [send_end.send([a], 5.0) for a in arrays])
    sending.start()   # each send returns once the receiver acknowledged it
    got = [recv_end.recv([(3, 17, 2, 8)], np.float32, 5.0)[0], recv_end.recv([(5, 4)], np.uint16, 5.0)[0]]
    sending.join(5.0)
    assert not sending.is_alive()
    assert all(np.array_equal(a, b) for a, b in zip(arrays, got))
    started = time.monotonic()
    with pytest.raises(LinkBroken):   # nothing sent
        recv_end.recv([(4,)], np.float32, 0.3)
    with pytest.raises(LinkBroken):   # nobody receives: no acknowledgement before the deadline
        send_end.send([arrays[1]], 0.3)
    assert time.monotonic() - started < 3.0
    receiver.close_all(), sender.close_all()


def test_async_transfers_run_on_the_link_thread_and_fail_as_link_broken():
    receiver, sender = open_pair(timeout_s=2.0)
    data = np.arange(12, dtype=np.float32).reshape(3, 4)

    async def both():
        got, _ = await asyncio.gather(receiver.get("L").recv([(3, 4)], np.float32, 2.0),
                                      sender.get("L").send([data], 2.0))
        assert np.array_equal(got[0], data)
        sender.close("L")   # a closed link refuses work with LinkBroken, not another error
        with pytest.raises(LinkBroken):
            await receiver.get("L").recv([(3, 4)], np.float32, 2.0)

    asyncio.run(both())
    receiver.close_all()


def test_closing_a_link_unblocks_its_receive():
    receiver, sender = open_pair(timeout_s=30.0)
    endpoint, failure = receiver.get("L").ready.result(), []

    def wait() -> None:
        try:
            endpoint.recv([(1 << 20,)], np.float32, 30.0)
        except LinkBroken as err:
            failure.append(err)

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.2)
    receiver.close("L")
    thread.join(5.0)
    assert not thread.is_alive() and failure
    assert len(receiver) == 0
    sender.close_all()


@pytest.mark.parametrize("args, field", [(("", "tcp", 1, b""), "link_id"), (("L", "nccl", 1, b""), "transport"),
                                         (("L", "tcp", 2, b""), "rank"), (("L", "tcp", 0, b""), "unique_id")])
def test_bad_open_arguments_name_the_field(args, field):
    links = KVLinks(create_backend("numpy"), "127.0.0.1", 1.0)
    with pytest.raises(ValueError, match=field):
        asyncio.run(links.open(*args))
    assert len(links) == 0


def push_over(stub, link: TcpLink, header: worker_pb2.KVChunk, arrays, commit: worker_pb2.KVChunk):
    """PushKV with the header, the arrays over `link` once the header is out, then the commit."""
    def messages():
        yield header
        link.send(arrays, 10.0)
        yield commit

    return stub.PushKV(messages(), timeout=30)


def test_a_real_worker_receives_over_a_link(worker, reference):  # noqa: F811
    _, stub, _ = worker
    for request, field in [(worker_pb2.OpenKVLinkRequest(link_id="x", transport="nccl", rank=1), "transport"),
                           (worker_pb2.OpenKVLinkRequest(transport="tcp", rank=1), "link_id"),
                           (worker_pb2.OpenKVLinkRequest(link_id="x", transport="tcp", rank=0), "unique_id")]:
        with pytest.raises(grpc.RpcError) as err:
            stub.OpenKVLink(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    assert "tcp" in stub.GetStatus(worker_pb2.WorkerStatusRequest(), timeout=10).kv_transports

    rng = np.random.default_rng()
    prompt = rng.integers(0, 49152, 45).tolist()
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=int(rng.integers(1 << 30)), ignore_eos=True)
    want = reference.generate([prompt], [params])[0].token_ids
    reference.add_request("p", prompt, dataclasses.replace(params, max_tokens=1), kv_export_from=0)
    outputs = []
    while reference.has_unfinished():
        outputs += reference.step()
    export = join_pieces([out.kv_export for out in outputs if out.kv_export is not None])
    first = outputs[-1].new_token_ids[0]

    unique_id = stub.OpenKVLink(worker_pb2.OpenKVLinkRequest(link_id="L", transport="tcp", rank=1),
                                timeout=10).unique_id
    link = TcpLink.connect(unique_id, 10.0)
    call = stub.Generate(worker_pb2.WorkerGenerateRequest(
        request_id="r", prompt_token_ids=prompt, sampling=sampling_params_to_proto(params), remote_prefill=True),
        timeout=60)
    assert next(call).reservation.reserved

    with pytest.raises(grpc.RpcError) as err:   # drained: the link stays in step
        push_over(stub, link, link_header("ghost", export, "L"), [export.k, export.v],
                  commit_chunk("ghost", first, None))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "request_id" in err.value.details()

    response = push_over(stub, link, link_header("r", export, "L"), [export.k, export.v],
                         commit_chunk("r", first, None))
    assert response.num_bytes == export.num_bytes
    got = [t for r in call for t in r.token_ids]
    assert got == want and got[0] == first   # the first token came from the prefill side

    bad = dataclasses.replace(export, k=export.k[:-1], v=export.v[:-1])   # one layer short
    with pytest.raises(grpc.RpcError) as err:
        stub.PushKV(iter([link_header("r", bad, "L"), commit_chunk("r", first, None)]), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "num_layers" in err.value.details()
    assert not stub.CloseKVLink(worker_pb2.CloseKVLinkRequest(link_id="L"), timeout=10).found   # closed there
    link.abort()
    status = wait_idle(stub)
    assert (status.num_reserved, status.num_running) == (0, 0)
    assert stub.GetStatus(worker_pb2.WorkerStatusRequest(check_integrity=True), timeout=10).integrity_error == ""
