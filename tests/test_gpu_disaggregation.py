"""Served disaggregation on two GPUs with the KV over an NCCL pair link: a
prefill group on GPU 0 and a decode group on GPU 1 (CUDA, fp32, the tiny
random Llama whose logits are far apart) stream, for 48 concurrent
requests, the completions of offline generation on one GPU: greedy ones
exactly, seeded sampled ones at least 90%. Long prompts go remote, in
pieces of 32 tokens each pushed while the next computes, over the one
link the coordinator opened (stats count them), and both groups end with
every block free and no reservation left."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import yaml

from gpu_guard import NUM_GPUS
from shardline.worker.engine import EngineConfig, LLMEngine
from shardline.worker.offline import load_local

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(NUM_GPUS < 2, reason="needs two GPUs")]
pytest.importorskip("torch")
from serving_fixtures import collect, running_cluster  # noqa: E402
from test_disaggregation import MIN_REMOTE_TOKENS, assert_clean, cases, wait_idle  # noqa: E402
from test_serving_tp import tiny_model_with_tokenizer  # noqa: E402

ENGINE = {"backend": "cuda", "dtype": "float32", "num_kv_blocks": 384, "max_num_seqs": 64, "block_size_tokens": 16}


def write_config(folder, model) -> str:
    data = {"model": str(model), "served_model_name": "tiny", "engine": ENGINE,
            "coordinator": {"host": "127.0.0.1", "port": 0, "heartbeat_interval_s": 0.25, "startup_timeout_s": 300,
                            "disaggregation": {"min_remote_prefill_tokens": MIN_REMOTE_TOKENS,
                                               "max_prefill_in_flight": 64, "transport": "nccl"}},
            # 32 prompt tokens a step on the prefill group: long prompts cross the link in pieces.
            "groups": [{"name": "prefill", "role": "prefill", "devices": [0],
                        "engine": {"max_num_batched_tokens": 32}},
                       {"name": "decode", "role": "decode", "devices": [1]}]}
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_nccl_link_handoff_equals_offline(tmp_path):
    model = tiny_model_with_tokenizer(tmp_path / "tiny")
    offline = LLMEngine(EngineConfig(**ENGINE), load_local(str(model), backend="cuda", dtype="float32",
                                                           show_progress=False))
    batch = cases(48, seed=11)
    expected = [c.token_ids for c in offline.generate([c.text for c in batch], [c.params() for c in batch])]
    num_long = sum(len(offline.tokenizer.encode(c.text)) >= MIN_REMOTE_TOKENS for c in batch)
    with running_cluster(write_config(tmp_path, model)) as served:
        stub = served.stub()

        async def run_all():
            return await asyncio.gather(*(collect(stub, c.request()) for c in batch))

        results = served.run(run_all(), 300)
        stats = served.run(served.stats()).disaggregation
        statuses = served.run(wait_idle(served, ["prefill", "decode"]))
    sampled_equal, sampled = 0, 0
    for case, want, (responses, code, details) in zip(batch, expected, results):
        assert code == grpc.StatusCode.OK, details
        got = [t for r in responses for t in r.token_ids]
        if case.temperature == 0.0:
            assert got == want, f"{case.text!r}"
        else:
            sampled, sampled_equal = sampled + 1, sampled_equal + (got == want)
    print(f"nccl link: {stats.remote_prefills} remote, {stats.local_prefills} local, {stats.kv_transfer_bytes} KV "
          f"bytes in {stats.kv_transfer_s:.4f} s; sampled equal {sampled_equal}/{sampled}")
    assert sampled_equal >= 0.9 * sampled
    assert (stats.remote_prefills, stats.local_prefills, stats.fallbacks) == (num_long, len(batch) - num_long, 0)
    assert (stats.kv_link_transfers, stats.kv_links_opened) == (num_long, 1)
    assert_clean(statuses)
