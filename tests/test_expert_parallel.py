"""Expert parallelism on the CPU backend over real MPI processes (MPICH).

ep = 2, ep = 4 (attention replicated, tp = 1) and tp = 2 x ep = 2 (attention
split over the same two ranks that hold the experts) give the same greedy
tokens as one rank, logits within 1e-5 relative and the same expert loads,
for tiny random Mixtral and Qwen2-MoE configs (8 experts, top-2, 4 query /
2 KV heads); the prompt (17 tokens) splits unevenly over the ranks and
each decode step (1 token) leaves some ranks an empty share. Each rank
holds 1/ep of the expert bytes. Plus in-process checks of the pieces:
token shares, placement, layout errors, the load metric, all_to_all_v.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mpi_launch import mpirun, needs_mpi
from mpi_tp_run import resident_bytes
from shardline.kernels.backend import create_backend
from shardline.models.loader import load_model
from shardline.models.moe import SparseMoE
from shardline.parallel.communicator import SingleRank
from shardline.parallel.experts import (ExpertLayoutError, ExpertLoad, ExpertParallel, ExpertPlacement,
                                        check_expert_layout, token_share)
from shardline.parallel.sharding import TensorParallel
from shardline.worker.generate import generate, prompt_logits
from shardline.worker.sampling_params import SamplingParams

pytest.importorskip("mpi4py")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NUM_TOKENS = 8
PROMPT_LEN = 17

SHAPE = dict(vocab_size=503, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=128,
             num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2)
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**SHAPE, num_local_experts=8),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**SHAPE, num_experts=8, moe_intermediate_size=48,
                                                     shared_expert_intermediate_size=80, norm_topk_prob=False),
}
CLASSES = {"mixtral": transformers.MixtralForCausalLM, "qwen2_moe": transformers.Qwen2MoeForCausalLM}


class FakeGroup:
    """A communicator that only knows its size: enough to build (not run) a layout."""

    def __init__(self, size: int):
        self.rank, self.size = 0, size


def save(name: str, folder: Path, seed: int, max_positions: int | None = None) -> Path:
    config = CONFIGS[name]()
    config.max_position_embeddings = max_positions or config.max_position_embeddings
    torch.manual_seed(seed)
    model = CLASSES[name](config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2) if param.dim() >= 2 else param.copy_(1 + 0.1 * torch.randn_like(param))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def mpi_run(num_ranks: int, *args: str) -> None:
    mpirun(num_ranks, "mpi_ep_run.py", *args)


def expert_bytes(model) -> int:
    return resident_bytes([layer.mlp.experts for layer in model.layers if isinstance(layer.mlp, SparseMoE)])


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request, tmp_path_factory):
    """One checkpoint per model and its single-rank results."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    folder = save(request.param, tmp_path_factory.mktemp(request.param), seed)
    prompt = np.random.default_rng(seed).integers(0, 503, PROMPT_LEN).tolist()
    single = load_model(folder, create_backend("numpy", "float32"), show_progress=False).model
    logits = prompt_logits(single, prompt)
    loads = np.stack([load.tokens_per_expert for load in single.expert_loads()])
    tokens = list(generate(single, prompt, SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)))
    return dict(folder=folder, seed=seed, prompt=prompt, logits=logits, loads=loads, tokens=tokens,
                expert_bytes=expert_bytes(single))


@needs_mpi
@pytest.mark.parametrize("tp,ep", [(1, 2), (1, 4), (2, 2)], ids=["ep2", "ep4", "tp2xep2"])
def test_ep_matches_single_rank(reference, tp, ep, tmp_path):
    out, seed = tmp_path / "out.npz", reference["seed"]
    mpi_run(ep, "model", str(reference["folder"]), ",".join(map(str, reference["prompt"])), str(NUM_TOKENS),
            str(out), str(tp))
    got = dict(np.load(out))
    ref_logits = reference["logits"]
    err = np.max(np.abs(got["logits"] - ref_logits)) / np.max(np.abs(ref_logits))
    assert err <= 1e-5, f"seed {seed}: logits rel err {err:.2e}"
    assert got["tokens"].tolist() == reference["tokens"], f"seed {seed}"
    assert np.array_equal(got["loads"], reference["loads"]), f"seed {seed}"
    assert got["expert_bytes"].tolist() == [reference["expert_bytes"] // ep] * ep


@needs_mpi
@pytest.mark.parametrize("num_ranks", [3, 4])
def test_all_to_all_v_uneven_counts(num_ranks):
    mpi_run(num_ranks, "all_to_all")


@pytest.mark.parametrize("num_tokens", [0, 1, 2, 5, 17, 64])
@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4])
def test_token_shares_cover_the_tokens_in_order(num_tokens, num_ranks):
    shares = [token_share(num_tokens, num_ranks, r) for r in range(num_ranks)]
    assert shares[0][0] == 0 and shares[-1][1] == num_tokens
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    assert max(stop - start for start, stop in shares) == -(-num_tokens // num_ranks)


def test_placement_is_contiguous_whole_experts():
    assert [list(ExpertPlacement(8, 4, r).local_experts) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ExpertLayoutError, match=r"num_experts \(6\) must be divisible by ep \(4\)"):
        ExpertPlacement(6, 4, 0)


def test_impossible_layouts_fail_clearly():
    with pytest.raises(ExpertLayoutError, match=r"ep \(4\) must equal tp \(2\)"):
        check_expert_layout(8, 2, 4)
    with pytest.raises(ExpertLayoutError, match="needs a mixture-of-experts model"):
        check_expert_layout(0, 1, 2)
    check_expert_layout(8, 2, 1)  # ep = 1 under any tp: experts sliced, as before


def test_model_refuses_experts_not_divisible_by_ep(tmp_path):
    from shardline.models.loader import open_checkpoint, parse_config
    from shardline.models.weights import WeightReader
    folder = save("mixtral", tmp_path / "m", seed=0)
    config, model_class = parse_config(open_checkpoint(folder))
    reader = WeightReader(open_checkpoint(folder), create_backend("numpy"), show_progress=False)
    with pytest.raises(ExpertLayoutError, match=r"num_experts \(8\) must be divisible by ep \(3\)"):
        model_class(reader.backend, config, reader, TensorParallel(), ep=ExpertParallel(FakeGroup(3)))


def test_expert_load_imbalance_ratio():
    assert ExpertLoad(np.array([2, 2, 2, 2])).imbalance_ratio == 1.0
    assert ExpertLoad(np.array([6, 2, 0, 0])).imbalance_ratio == 3.0
    assert ExpertLoad(np.zeros(4, dtype=np.int64)).imbalance_ratio == 1.0


def test_single_rank_all_to_all_v_is_the_identity():
    rows = np.arange(12.0).reshape(4, 3)
    got, counts = SingleRank().all_to_all_v(rows, [4])
    assert got is rows and counts == [4]
    with pytest.raises(ValueError, match="send_counts"):
        SingleRank().all_to_all_v(rows, [3])
