"""Served disaggregation on two GPUs with the KV over an NCCL pair link: a
prefill group on GPU 0 and a decode group on GPU 1 (CUDA, fp32, the tiny
random Llama whose logits are far apart) stream, for 48 concurrent
requests, the completions of offline generation on one GPU: greedy ones
exactly, seeded sampled ones at least 90%. Long prompts go remote, in
pieces of 32 tokens each pushed while the next computes, over the one
link the coordinator opened (stats count them), and both groups end with
every block free and no reservation left. Then 100 requests cancelled at
random moments of their hand-off leave both groups clean and the link
still serving."""

from __future__ import annotations

import asyncio
import random

import grpc
import numpy as np
import pytest

from gpu_guard import NUM_GPUS
from shardline.worker.engine import EngineConfig, LLMEngine
from shardline.worker.offline import load_local

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(NUM_GPUS < 2, reason="needs two GPUs")]
pytest.importorskip("torch")
from serving_fixtures import collect, running_cluster  # noqa: E402
from test_disaggregation import MIN_REMOTE_TOKENS, assert_clean, cases, wait_idle, write_config  # noqa: E402
from test_serving_tp import tiny_model_with_tokenizer  # noqa: E402

ENGINE = {"backend": "cuda", "dtype": "float32", "num_kv_blocks": 384, "max_num_seqs": 64, "block_size_tokens": 16}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_with_tokenizer(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def offline(model):
    return LLMEngine(EngineConfig(**ENGINE), load_local(str(model), backend="cuda", dtype="float32",
                                                        show_progress=False))


@pytest.fixture(scope="module")
def served(model, tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("cluster"), model, transport="nccl", engine=ENGINE,
                          devices=([0], [1]))
    with running_cluster(config) as served:
        yield served


def run_batch(served, batch):
    stub = served.stub()

    async def run_all():
        return await asyncio.gather(*(collect(stub, c.request()) for c in batch))

    return served.run(run_all(), 300)


def check_outputs(batch, expected, results) -> tuple[int, int]:
    """Greedy outputs exactly; returns (sampled outputs equal, sampled outputs)."""
    sampled_equal, sampled = 0, 0
    for case, want, (responses, code, details) in zip(batch, expected, results):
        assert code == grpc.StatusCode.OK, details
        got = [t for r in responses for t in r.token_ids]
        if case.temperature == 0.0:
            assert got == want, f"{case.text!r}"
        else:
            sampled, sampled_equal = sampled + 1, sampled_equal + (got == want)
    return sampled_equal, sampled


def test_nccl_link_handoff_equals_offline(served, offline):
    batch = cases(48, seed=11)
    expected = [c.token_ids for c in offline.generate([c.text for c in batch], [c.params() for c in batch])]
    num_long = sum(len(offline.tokenizer.encode(c.text)) >= MIN_REMOTE_TOKENS for c in batch)
    results = run_batch(served, batch)
    stats = served.run(served.stats()).disaggregation
    statuses = served.run(wait_idle(served, ["prefill", "decode"]))
    sampled_equal, sampled = check_outputs(batch, expected, results)
    print(f"nccl link: {stats.remote_prefills} remote, {stats.local_prefills} local, {stats.kv_transfer_bytes} KV "
          f"bytes in {stats.kv_transfer_s:.4f} s; sampled equal {sampled_equal}/{sampled}")
    assert sampled_equal >= 0.9 * sampled
    assert (stats.remote_prefills, stats.local_prefills, stats.fallbacks) == (num_long, len(batch) - num_long, 0)
    assert (stats.kv_link_transfers, stats.kv_links_opened) == (num_long, 1)
    assert_clean(statuses)


def test_cancelled_nccl_handoffs_leak_nothing_and_the_link_serves_on(served, offline):
    """100 requests cancelled at random moments (pieces under way on the link included):
    both groups end clean, and the next batch is still served right, over a link."""
    rng = random.Random(int(np.random.SeedSequence().entropy % 2**31))
    stub = served.stub()

    async def cancel_at_random(case):
        call = stub.Generate(case.request())
        await asyncio.sleep(rng.uniform(0.0, 0.5))
        call.cancel()

    async def storm():
        await asyncio.gather(*(cancel_at_random(c) for c in cases(100, seed=23)))
        return await wait_idle(served, ["prefill", "decode"])

    assert_clean(served.run(storm(), 300))
    before = served.run(served.stats()).disaggregation
    batch = cases(16, seed=31)
    expected = [c.token_ids for c in offline.generate([c.text for c in batch], [c.params() for c in batch])]
    sampled_equal, sampled = check_outputs(batch, expected, run_batch(served, batch))
    after = served.run(served.stats()).disaggregation
    print(f"after the storm: {before}; after the next batch: {after}".replace("\n", " "))
    assert sampled_equal >= 0.9 * sampled
    assert after.kv_link_transfers > before.kv_link_transfers
    assert_clean(served.run(wait_idle(served, ["prefill", "decode"])))
