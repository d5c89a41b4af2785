"""A Mixtral engine's decode steps in CUDA graphs: up to SparseMoE.dense_max_tokens rows every
expert runs on every row on the device (no host sync), so those buckets are captured and replay
the eager engine's tokens; larger steps run the sorted experts eagerly, graphs still on."""

from __future__ import annotations

import numpy as np
import pytest

from gpu_guard import cupy  # noqa: E402  (skips the module without a GPU)
from engine_fixtures import make_engine, tiny_local
from hf_models import save_tiny
from shardline.models.moe import SparseMoE
from shardline.worker.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    folder, _ = save_tiny("mixtral", tmp_path_factory.mktemp("tiny") / "mixtral", seed)
    return tiny_local(folder, backend="cuda", dtype="float32")


def generate_both(local, prompts, params, max_num_seqs):
    eager = [c.token_ids for c in make_engine(local, cuda_graphs=False, max_num_seqs=max_num_seqs)
             .generate(prompts, params)]
    engine = make_engine(local, max_num_seqs=max_num_seqs)
    graphed = [c.token_ids for c in engine.generate(prompts, params)]
    return eager, graphed, engine.runner.graphs


def test_mixtral_graphed_decode_equals_eager(local):
    rng = np.random.default_rng()
    vocab = local.model.config.vocab_size
    prompts = [rng.integers(0, vocab, n).tolist() for n in (5, 17, 40, 3, 9)]
    params = [SamplingParams(max_tokens=int(m), temperature=t, seed=int(rng.integers(1 << 30)), ignore_eos=True)
              for m, t in zip(rng.integers(4, 16, 5), [0, 0.8, 0, 0.7, 0])]
    eager, graphed, graphs = generate_both(local, prompts, params, max_num_seqs=8)
    assert graphs.disabled is None and graphs.num_replays > 0
    assert graphed == eager


def test_mixtral_graphs_stop_at_the_dense_rows(local):
    """More rows than the dense path takes: those steps run eagerly, the graphs stay on."""
    rows = SparseMoE.dense_max_tokens + 5
    rng = np.random.default_rng()
    prompts = [rng.integers(0, local.model.config.vocab_size, 4).tolist() for _ in range(rows)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    eager, graphed, graphs = generate_both(local, prompts, params, max_num_seqs=rows)
    assert graphs.buckets[-1] == SparseMoE.dense_max_tokens
    assert graphs.disabled is None
    assert graphed == eager


def test_mixtral_bf16_graphs_run_the_chosen_experts_alone(tmp_path):
    """bf16, one row: each (token, slot) pair's expert alone (ops.expert_linear), in the graphs
    as eagerly."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    folder, _ = save_tiny("mixtral", tmp_path / "mixtral", seed)
    local = tiny_local(folder, backend="cuda", dtype="bfloat16")
    layer = next(layer.mlp for layer in local.model.layers if isinstance(layer.mlp, SparseMoE))
    assert layer._selects(cupy.zeros((1, local.model.config.hidden_size), dtype=cupy.uint16))
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, local.model.config.vocab_size, n).tolist() for n in (7, 30)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    eager, graphed, graphs = generate_both(local, prompts, params, max_num_seqs=2)
    assert graphs.disabled is None and graphs.num_replays > 0
    assert graphed == eager


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_mixtral_bf16_layer_paths_agree(rows, monkeypatch, tmp_path):
    """bf16 on the GPU, one MoE layer: the chosen experts alone (1 row), every expert (2 and 5
    rows) and the tokens sorted by expert on the host give the same output to bf16's rounding."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    folder, _ = save_tiny("mixtral", tmp_path / "mixtral", seed)
    model = tiny_local(folder, backend="cuda", dtype="bfloat16").model
    layer = next(layer.mlp for layer in model.layers if isinstance(layer.mlp, SparseMoE))
    rows_in = np.random.default_rng(seed).standard_normal((rows, model.config.hidden_size))
    x = model.backend.ops.from_float(rows_in, "bfloat16")
    assert layer._selects(x) == (rows == 1)
    device = model.backend.to_numpy(layer(x))
    monkeypatch.setattr(SparseMoE, "dense_max_tokens", 0)
    host = model.backend.to_numpy(layer(x))
    err = np.linalg.norm(device - host) / np.linalg.norm(host)
    assert err <= 1e-2, f"seed {seed}: rows {rows}: relative error {err:.2e}"
