"""Pipeline parallelism on the CPU backend over real MPI processes (MPICH):
pp = 2, pp = 3 (uneven split) and tp = 2 × pp = 2 give the same greedy
tokens as one rank and logits within 1e-5 relative (float32) for tiny
random Llama and Mixtral configs; each stage holds only its share of the
weights. The engine core across stages (pp = 2): batched equals
sequential, preemption in a small pool and prefix reuse stay exact, and
log-probabilities come back from the last stage. Bad layouts fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mpi_launch import mpirun, needs_mpi
from mpi_tp_run import resident_bytes
from shardline.coordinator.cluster_config import ClusterConfigError, parse_cluster_config
from shardline.kernels.backend import create_backend
from shardline.models.errors import ModelLoadError
from shardline.models.loader import load_model
from shardline.parallel.pipeline import ParallelConfig, StagePlacement, split_by_cost
from shardline.worker.engine import EngineConfig, LLMEngine
from shardline.worker.generate import generate, prompt_logits
from shardline.worker.offline import LocalModel
from shardline.worker.sampling_params import SamplingParams

pytest.importorskip("mpi4py")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NUM_TOKENS, VOCAB = 10, 503

SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, max_position_embeddings=512,
             num_attention_heads=4, num_key_value_heads=2, eos_token_id=None, bos_token_id=None)


def save(kind: str, num_layers: int, folder: Path, seed: int, spread: float = 0.2) -> Path:
    if kind == "mixtral":
        config = transformers.MixtralConfig(**SHAPE, num_hidden_layers=num_layers, num_local_experts=4,
                                            num_experts_per_tok=2)
        model_class = transformers.MixtralForCausalLM
    else:
        config = transformers.LlamaConfig(**SHAPE, num_hidden_layers=num_layers)
        model_class = transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, spread) if param.dim() >= 2 else param.copy_(1 + 0.1 * torch.randn_like(param))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def run_pp(num_ranks: int, *args) -> None:
    mpirun(num_ranks, "mpi_pp_run.py", *args, timeout_s=120)


def stage_share_bytes(model, first: int, stop: int, is_first: bool, is_last: bool, tp: int) -> float:
    """One rank's share of a whole model's bytes: its stage's parts over tp,
    plus what every tp rank replicates (norms, the rotary table)."""
    layers = model.layers[first:stop]
    parts = list(layers) + ([model.embed] if is_first else []) + ([model.norm, model.lm_head] if is_last else [])
    replicated = [layers[0].attn.cos_sin] + [n for layer in layers for n in (layer.input_norm, layer.post_norm)]
    replicated_bytes = resident_bytes(replicated + ([model.norm] if is_last else []))
    return (resident_bytes(parts) - replicated_bytes) / tp + replicated_bytes


CASES = [  # (model, layers, tp, pp, split)
    ("llama", 4, 1, 2, "cost"),
    ("llama", 5, 1, 3, "2,2,1"),
    ("llama", 5, 1, 3, "cost"),
    ("llama", 4, 2, 2, "cost"),
    ("mixtral", 3, 1, 2, "1,2"),
    ("mixtral", 4, 2, 2, "cost"),
]


@needs_mpi
@pytest.mark.parametrize("kind,num_layers,tp,pp,split", CASES, ids=lambda v: str(v))
def test_pp_matches_single_rank(kind, num_layers, tp, pp, split, tmp_path):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    folder = save(kind, num_layers, tmp_path / kind, seed)
    prompt = np.random.default_rng(seed).integers(0, VOCAB, 17).tolist()
    single = load_model(folder, create_backend("numpy", "float32"), show_progress=False).model
    ref_logits = prompt_logits(single, prompt)
    ref_tokens = list(generate(single, prompt, SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0,
                                                              ignore_eos=True)))
    run_pp(tp * pp, "model", folder, tp, pp, split, ",".join(map(str, prompt)), NUM_TOKENS, tmp_path / "out.npz")
    got = dict(np.load(tmp_path / "out.npz"))
    err = np.max(np.abs(got["logits"] - ref_logits)) / np.max(np.abs(ref_logits))
    assert err <= 1e-5, f"seed {seed}: logits rel err {err:.2e}"
    assert got["tokens"].tolist() == ref_tokens, f"seed {seed}"
    ranges = got["layers"][::tp].tolist()  # one per stage
    assert [a for a, _ in ranges] == [0] + [b for _, b in ranges[:-1]] and ranges[-1][1] == num_layers
    if split != "cost":
        assert [b - a for a, b in ranges] == [int(n) for n in split.split(",")]
    for rank, (first, stop) in enumerate(got["layers"].tolist()):
        stage = rank // tp
        share = stage_share_bytes(single, first, stop, stage == 0, stage == pp - 1, tp)
        assert 0.95 * share <= got["weight_bytes"][rank] <= 1.05 * share, (rank, got["weight_bytes"], share)


def test_cost_split_counts_embedding_and_head():
    assert split_by_cost([1] * 8, 4, 0, 2) == [2, 6]
    assert split_by_cost([1] * 8, 0, 4, 2) == [6, 2]
    assert split_by_cost([1] * 6, 0, 0, 3) == [2, 2, 2]
    assert sum(split_by_cost([5, 1, 1, 1, 1, 5], 3, 3, 4)) == 6


def test_bad_layouts_name_the_key(tmp_path):
    folder = save("llama", 3, tmp_path / "llama", 0)
    backend = create_backend("numpy", "float32")
    with pytest.raises(ModelLoadError, match="pp_layers"):
        load_model(folder, backend, False, placement=StagePlacement(ParallelConfig(1, 2, (1, 1)), 0))
    with pytest.raises(ModelLoadError, match=r"pp \(4\) exceeds the model's 3 layers"):
        load_model(folder, backend, False, placement=StagePlacement(ParallelConfig(1, 4), 0))
    for group, key in (({"pp": 2, "pp_layers": [3]}, "pp_layers"), ({"pp": 2, "pp_layers": [0, 3]}, "pp_layers")):
        with pytest.raises(ClusterConfigError, match=rf"groups\.0.*{key}"):
            parse_cluster_config({"groups": [{"name": "g", **group}]})
    spec = parse_cluster_config({"groups": [{"name": "g", "pp": 2, "pp_layers": [1, 2]}]}).group_specs()[0]
    assert spec.pp_layers == (1, 2)


def reference_tokens(folder: Path, prompts, max_tokens, **engine) -> list[list[int]]:
    local = LocalModel(load_model(folder, create_backend("numpy", "float64"), show_progress=False).model, None)
    settings = dict(backend="numpy", num_kv_blocks=512, block_size_tokens=16, max_num_batched_tokens=256)
    out = LLMEngine(EngineConfig(**{**settings, **engine}), local).generate(
        prompts, [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_tokens])
    return [c.token_ids for c in out]


def run_engine(folder: Path, tmp_path: Path, tp: int, pp: int, engine: dict, jobs: list[dict]) -> dict:
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps({"engine": {"block_size_tokens": 16, **engine}, "jobs": jobs}))
    run_pp(tp * pp, "engine", folder, tp, pp, "cost", spec, tmp_path / "out.json")
    return json.loads((tmp_path / "out.json").read_text())


@pytest.fixture(scope="module")
def engine_model(tmp_path_factory):
    seed = int(np.random.SeedSequence().entropy % 2**31)  # spread logits: greedy far from ties
    return save("llama", 4, tmp_path_factory.mktemp("pp") / "llama", seed, spread=0.3), seed


@needs_mpi
@pytest.mark.parametrize("tp", [1, 2])
def test_engine_batched_equals_sequential_and_prefix_reuse(engine_model, tp, tmp_path):
    folder, seed = engine_model
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in [1, 300, 2, 120, 17, 64, 33, 250]]
    max_tokens = rng.integers(1, 16, len(prompts)).tolist()
    prefix = rng.integers(0, VOCAB, 160).tolist()
    shared = [prefix + rng.integers(0, VOCAB, n).tolist() for n in (20, 9)]
    jobs = [dict(name="batched", mode="batched", prompts=prompts, max_tokens=max_tokens),
            dict(name="sequential", mode="sequential", prompts=prompts, max_tokens=max_tokens),
            dict(name="prefix", mode="sequential", prompts=shared, max_tokens=[8, 8]),
            dict(name="logprobs", mode="batched", prompts=prompts[:3], max_tokens=[4, 4, 4], logprobs=3)]
    got = run_engine(folder, tmp_path, tp, 2, dict(num_kv_blocks=512, max_num_batched_tokens=256), jobs)
    expected = reference_tokens(folder, prompts, max_tokens)
    assert got["jobs"]["batched"]["tokens"] == expected, f"seed {seed}"
    assert got["jobs"]["sequential"]["tokens"] == expected, f"seed {seed}"
    assert got["jobs"]["prefix"]["tokens"] == reference_tokens(folder, shared, [8, 8], enable_prefix_caching=False)
    assert got["stats"]["prefix_hit_tokens"] >= 160  # the second shared prompt reused the first's 10 blocks
    assert got["num_free_blocks"] == 512
    for tokens, entries in zip(got["jobs"]["logprobs"]["tokens"], got["jobs"]["logprobs"]["logprobs"]):
        assert len(entries) == len(tokens) == 4
        assert all(str(t) in e and len(e) >= 3 for t, e in zip(tokens, entries))
        assert all(max(e.values()) == e[str(t)] for t, e in zip(tokens, entries))  # greedy: the top one


@needs_mpi
def test_engine_small_pool_preempts_and_matches(engine_model, tmp_path):
    folder, seed = engine_model
    rng = np.random.default_rng(seed + 1)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in rng.integers(20, 120, 12)]
    max_tokens = rng.integers(8, 40, len(prompts)).tolist()
    jobs = [dict(name="preempt", mode="batched", prompts=prompts, max_tokens=max_tokens)]
    got = run_engine(folder, tmp_path, 1, 2, dict(num_kv_blocks=14, max_num_batched_tokens=64), jobs)
    assert got["jobs"]["preempt"]["tokens"] == reference_tokens(folder, prompts, max_tokens), f"seed {seed}"
    assert got["stats"]["num_preemptions"] > 0
    assert got["num_free_blocks"] == 14


@needs_mpi
def test_pp2_group_serves_like_one_rank(tmp_path):
    """The whole path: the launcher starts a pp = 2 group (`python -m shardline.worker`
    under mpiexec), which streams what one rank generates offline."""
    import asyncio

    import grpc
    import yaml

    import test_serving_tp as serving
    from serving_fixtures import collect
    from shardline.coordinator.cluster_config import load_cluster_config
    from shardline.coordinator.server import start_cluster
    from shardline.proto import shardline_pb2_grpc

    model = serving.tiny_model_with_tokenizer(tmp_path / "tiny")
    expected = serving.references(model)
    config_path = tmp_path / "cluster.yaml"
    config_path.write_text(yaml.safe_dump({
        "model": str(model), "served_model_name": "tiny", "engine": serving.ENGINE,
        "coordinator": {"host": "127.0.0.1", "port": 0, "heartbeat_interval_s": 0.25, "startup_timeout_s": 180},
        "groups": [{"name": "pp2", "pp": 2, "pp_layers": [1, 1]}]}))

    async def scenario():
        cluster = await start_cluster(load_cluster_config(config_path), config_path)
        try:
            async with grpc.aio.insecure_channel(cluster.address) as channel:
                stub = shardline_pb2_grpc.ShardlineStub(channel)
                return await asyncio.gather(*(collect(stub, c.request(), metadata=()) for c in serving.CASES))
        finally:
            await cluster.stop()

    for case, (responses, code, details) in zip(serving.CASES, asyncio.run(asyncio.wait_for(scenario(), 300))):
        assert code == grpc.StatusCode.OK, details
        tokens = [t for r in responses for t in r.token_ids]
        assert (tokens, "".join(r.text for r in responses)) == (list(expected[case.key][0]), expected[case.key][1])
