"""The coordinator's client API against in-process fake engine groups (no
model, no processes): streaming, validation errors that name the field,
admission limits, Abort, client cancel, deadlines, ListModels, GetStats,
the metrics endpoint, and `serve` refusing a bad config."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest

from coordinator_fakes import (MAX_MODEL_LEN, collect, expected_tokens, read_rest, request, run, shared_tokenizer,
                               tokens_of, until)
from shardline.coordinator.server import serve
from shardline.proto import shardline_pb2 as pb

GENERATE = "/shardline.v1.Shardline/Generate"


@pytest.fixture(scope="module")
def tokenizer():
    return shared_tokenizer()


def test_streams_tokens_usage_and_group(tmp_path, tokenizer):
    async def scenario(fake):
        prompts = [list(range(1 + i, 40 + 3 * i)) for i in range(8)]
        results = await asyncio.gather(*(collect(fake.stub, request(p, max_tokens=5, seed=i))
                                         for i, p in enumerate(prompts)))
        for i, (responses, code, _) in enumerate(results):
            assert code == grpc.StatusCode.OK
            assert tokens_of(responses) == expected_tokens(prompts[i], 5, i)
            assert responses[0].group in ("w-0", "w-1") and all(not r.group for r in responses[1:])
            last = responses[-1]
            assert last.finish_reason == pb.FINISH_REASON_LENGTH
            assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(prompts[i]), 5)
            assert "".join(r.text for r in responses) == "".join(f"<{t}>" for t in tokens_of(responses))
        stats = await fake.stub.GetStats(pb.GetStatsRequest())
        assert stats.queue_depth == 0 and stats.requests_total == 8
        assert sorted(g.name for g in stats.groups) == ["w-0", "w-1"]
        assert all(g.healthy and g.requests_routed > 0 and g.in_flight == 0 for g in stats.groups)
        assert stats.groups[0].num_kv_blocks == 64
    run(tmp_path, tokenizer, scenario)


def test_text_and_chat_prompts_are_tokenized_here(tmp_path, tokenizer):
    async def scenario(fake):
        await collect(fake.stub, request(prompt="The capital of France is"))
        await collect(fake.stub, request(prompt="Hi there", chat=True))
        seen = [list(r.prompt_token_ids) for g in fake.groups for r in g.worker.requests]
        chat = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}]),
                                add_special_tokens=False)
        assert tokenizer.encode("The capital of France is") in seen and chat in seen
    run(tmp_path, tokenizer, scenario)


INVALID = [
    (request(prompt=""), "prompt"),
    (pb.GenerateRequest(), "prompt"),
    (request(model="other-model"), "model"),
    (request(max_tokens=0), "sampling.max_tokens"),
    (request(max_tokens=-3), "sampling.max_tokens"),
    (request(max_tokens=5000), "sampling.max_tokens"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingOptions(top_p=0.0)), "sampling.top_p"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingOptions(top_p=1.5)), "sampling.top_p"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingOptions(temperature=-1)), "sampling.temperature"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingOptions(logprobs=50)), "sampling.logprobs"),
    (request(ids=[5] * (MAX_MODEL_LEN + 10)), "prompt"),
    (request(ids=[5] * (MAX_MODEL_LEN - 10), max_tokens=20), "sampling.max_tokens"),
    (request(chat=True), "chat"),
    (request(ids=[]), "prompt"),
    (request(request_id="r" * 300), "request_id"),
]


def test_malformed_requests_name_the_field_and_the_server_keeps_serving(tmp_path, tokenizer):
    async def scenario(fake):
        for req, field in INVALID:
            responses, code, details = await collect(fake.stub, req)
            assert (code, responses) == (grpc.StatusCode.INVALID_ARGUMENT, []), (field, code, details)
            assert details.startswith(field), (field, details)
        for field, raw in [("prompt", b"\x1a\x02\xff\xfe"), ("sampling.stop", b"\x32\x04\x52\x02\xc3\x28"),
                           ("request", b"\x1a\x7f")]:
            call = fake.channel.unary_stream(GENERATE)(raw)  # no serializer: the bytes go as they are
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call:
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith(field), err.value.details()
        responses, code, _ = await collect(fake.stub, request())
        assert code == grpc.StatusCode.OK and len(tokens_of(responses)) == 4
        assert sum(len(g.worker.requests) for g in fake.groups) == 1  # nothing invalid reached a worker
    run(tmp_path, tokenizer, scenario)


def test_oversize_message_is_refused(tmp_path, tokenizer):
    async def scenario(fake):
        _, code, _ = await collect(fake.stub, request(prompt="a" * (1 << 20)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        _, code, _ = await collect(fake.stub, request())
        assert code == grpc.StatusCode.OK
    run(tmp_path, tokenizer, scenario, coordinator={"limits": {"max_message_bytes": 64 << 10}})


def test_admission_limit(tmp_path, tokenizer):
    async def scenario(fake):
        results = await asyncio.gather(*(collect(fake.stub, request(max_tokens=20)) for _ in range(3)))
        codes = sorted(code.name for _, code, _ in results)
        assert codes == ["OK", "OK", "RESOURCE_EXHAUSTED"]
        assert "max_in_flight" in next(d for _, c, d in results if c != grpc.StatusCode.OK)
    run(tmp_path, tokenizer, scenario, coordinator={"limits": {"max_in_flight": 2}}, token_delay_s=0.03)


def test_abort_ends_the_stream_and_the_worker_request(tmp_path, tokenizer):
    async def scenario(fake):
        call = fake.stub.Generate(request(max_tokens=400, request_id="job-1"))
        first = await call.read()
        assert (await fake.stub.Abort(pb.AbortRequest(request_id="job-1"))).found
        rest = await read_rest(call)
        assert rest[-1].finish_reason == pb.FINISH_REASON_ABORT
        assert rest[-1].usage.completion_tokens == len(tokens_of([first, *rest])) < 400
        assert not (await fake.stub.Abort(pb.AbortRequest(request_id="job-1"))).found
        await until(lambda: "job-1" in [rid for g in fake.groups for rid in g.worker.cancelled])
    run(tmp_path, tokenizer, scenario)


def test_client_cancel_and_deadline_cancel_the_worker_call(tmp_path, tokenizer):
    async def scenario(fake):
        call = fake.stub.Generate(request(max_tokens=400, request_id="gone"))
        await call.read()
        call.cancel()
        _, code, _ = await collect(fake.stub, request(max_tokens=400, request_id="late"), timeout=0.3)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        await until(lambda: {"gone", "late"} <= {rid for g in fake.groups for rid in g.worker.cancelled}
                    and not any(g.worker.active for g in fake.groups))
        stats = await fake.stub.GetStats(pb.GetStatsRequest())
        assert stats.queue_depth == 0 and all(g.in_flight == 0 for g in stats.groups)
    run(tmp_path, tokenizer, scenario)


def test_list_models(tmp_path, tokenizer):
    async def scenario(fake):
        models = (await fake.stub.ListModels(pb.ListModelsRequest())).models
        assert [(m.name, m.max_model_len, m.num_groups) for m in models] == [("fake", MAX_MODEL_LEN, 2)]
    run(tmp_path, tokenizer, scenario)


def test_metrics_endpoint(tmp_path, tokenizer):
    async def scenario(fake):
        await collect(fake.stub, request())
        await collect(fake.stub, request(max_tokens=0))
        url = f"http://127.0.0.1:{fake.cluster.metrics_port}/metrics"
        return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    text = run(tmp_path, tokenizer, scenario, coordinator={"metrics_port": 0})
    for needle in ("shardline_time_to_first_token_seconds_count 1.0", "shardline_inter_token_latency_seconds",
                   "shardline_e2e_request_latency_seconds_count 1.0", "shardline_queue_depth 0.0",
                   'shardline_group_kv_usage{group="w-0"}', 'shardline_requests_by_status_total{code="OK"} 1.0',
                   'shardline_requests_by_status_total{code="INVALID_ARGUMENT"} 1.0',
                   'shardline_requests_finished_total{finish_reason="length"} 1.0',
                   'shardline_group_in_flight_requests{group='):
        assert needle in text, needle


def test_serve_refuses_a_bad_config(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("groups:\n  - name: g0\n    tp: 0\n")
    assert serve(str(path)) == 2
    assert "groups.0.tp" in capsys.readouterr().err


def test_serve_refuses_a_missing_model(tmp_path, capsys):
    path = tmp_path / "cluster.yaml"
    path.write_text(f"model: {tmp_path / 'missing.gguf'}\ncoordinator: {{port: 0}}\ngroups: [{{name: g0}}]\n")
    assert serve(str(path)) == 2
    assert "model:" in capsys.readouterr().err


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
