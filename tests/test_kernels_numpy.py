"""numpy_ops (the reference every backend is held to) against independent
references in float64: torch CPU ops, a hand-written HF rotate_half rope, a
pure-integer SplitMix64, and the sampler's statistics.

Inputs are fresh random draws on each run; the seed is printed so a failure
can be replayed. Sizes are deliberately odd (hidden 80, 5 heads, 1 KV head,
vocab 503).
"""

from __future__ import annotations


import numpy as np
import pytest

from shardline.kernels import numpy_ops, sampling_rng
from shardline.kernels.rope import rope_cos_sin

torch = pytest.importorskip("torch")
F = torch.nn.functional

MASK64 = (1 << 64) - 1


@pytest.fixture
def rng():
    seed = int(np.random.SeedSequence().entropy % 2**63)
    print(f"random seed {seed}")
    return np.random.default_rng(seed)


def t(x):
    return torch.from_numpy(np.asarray(x, dtype=np.float64))


def assert_matches(ours, ref, rtol=1e-10, atol=1e-12):
    np.testing.assert_allclose(ours, ref.numpy() if hasattr(ref, "numpy") else ref, rtol=rtol, atol=atol)


def test_linear_embedding_add(rng):
    x, w, b = rng.standard_normal((7, 80)), rng.standard_normal((33, 80)), rng.standard_normal(33)
    assert_matches(numpy_ops.linear(x, w), F.linear(t(x), t(w)))
    assert_matches(numpy_ops.linear(x, w, b), F.linear(t(x), t(w), t(b)))
    residual = rng.standard_normal((7, 33))
    want = t(residual) + F.linear(t(x), t(w))
    summed = numpy_ops.linear_add(x, w, residual)
    assert summed is residual   # in residual's memory, as on CUDA
    assert_matches(summed, want)
    with pytest.raises(ValueError, match="residual"):
        numpy_ops.linear_add(x, w, np.zeros(33))   # would broadcast
    table, ids = rng.standard_normal((503, 80)), rng.integers(0, 503, size=11)
    assert_matches(numpy_ops.embedding(table, ids), F.embedding(torch.from_numpy(ids), t(table)))
    assert_matches(numpy_ops.index_rows(table, ids), t(table).index_select(0, torch.from_numpy(ids)))
    y = x[::-1].copy()
    assert_matches(numpy_ops.add(x, y), t(x) + t(y))


def test_norms_match_torch(rng):
    x, res = rng.standard_normal((5, 80)) * 3, rng.standard_normal((5, 80))
    w, b = 1 + 0.1 * rng.standard_normal(80), rng.standard_normal(80)
    assert_matches(numpy_ops.rms_norm(x, w, 1e-6), F.rms_norm(t(x), (80,), t(w), 1e-6))
    normed, h = numpy_ops.rms_norm(x, w, 1e-6, residual=res)
    assert_matches(normed, F.rms_norm(t(x) + t(res), (80,), t(w), 1e-6))
    assert_matches(h, t(x) + t(res))
    assert_matches(numpy_ops.layer_norm(x, w, b, 1e-5), F.layer_norm(t(x), (80,), t(w), t(b), 1e-5))
    normed, h = numpy_ops.layer_norm(x, w, b, 1e-5, residual=res)
    assert_matches(normed, F.layer_norm(t(x) + t(res), (80,), t(w), t(b), 1e-5))
    assert_matches(h, t(x) + t(res))


def test_activations_and_softmax_match_torch(rng):
    x = rng.standard_normal((9, 2 * 77)) * 3
    gate, up = t(x).chunk(2, dim=-1)
    assert_matches(numpy_ops.silu_and_mul(x), F.silu(gate) * up)
    assert_matches(numpy_ops.gelu(x, "tanh"), F.gelu(t(x), approximate="tanh"))
    assert_matches(numpy_ops.gelu(x, "none"), F.gelu(t(x), approximate="none"))
    with pytest.raises(ValueError, match="approximate"):
        numpy_ops.gelu(x, "erf")
    assert_matches(numpy_ops.softmax(x), F.softmax(t(x), dim=-1))
    assert numpy_ops.softmax(x.astype(np.float16)).dtype == np.float32


def hf_rope(x, cos_half, sin_half):
    """HF Llama's apply_rotary_pos_emb for one tensor [T, H, D]."""
    cos = torch.cat([cos_half, cos_half], dim=-1)[:, None, :]
    sin = torch.cat([sin_half, sin_half], dim=-1)[:, None, :]
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def test_rope_matches_hf_rotate_half(rng):
    table = rope_cos_sin(64, 2048, 10000.0)
    q, k = rng.standard_normal((9, 5, 64)), rng.standard_normal((9, 1, 64))
    positions = rng.integers(0, 2048, size=9)
    q_out, k_out = numpy_ops.rope(q, k, positions, table)
    cos_half, sin_half = t(table[positions, :32]), t(table[positions, 32:])
    assert_matches(q_out, hf_rope(t(q), cos_half, sin_half))
    assert_matches(k_out, hf_rope(t(k), cos_half, sin_half))


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_qkv_rope_against_torch(rng, with_residual):
    """The attention block's start over a paged cache: RMSNorm, the q, k, v projections,
    rotate-half rope on q and k, k and v into their slots (torch's ops, HF's rope)."""
    tokens, hidden, heads, kv_heads, head_dim, blocks, block_size = 3, 80, 5, 1, 16, 4, 4
    x, weight_norm = rng.standard_normal((tokens, hidden)), rng.standard_normal(hidden)
    residual = rng.standard_normal((tokens, hidden)) if with_residual else None
    wq, wk, wv = (rng.standard_normal((n * head_dim, hidden)) for n in (heads, kv_heads, kv_heads))
    table, positions = rope_cos_sin(head_dim, 64, 10000.0), rng.integers(0, 64, size=tokens)
    slots = rng.choice(blocks * block_size, size=tokens, replace=False)
    k_cache, v_cache = np.zeros((2, blocks, block_size, kv_heads, head_dim))
    q, new_residual = numpy_ops.rms_norm_qkv_rope(x, weight_norm, 1e-5, residual, np.concatenate([wq, wk, wv]), None,
                                                  positions, table, heads, k_cache, v_cache, slots)
    h = t(x) + (t(residual) if with_residual else 0)
    normed = F.rms_norm(h, (hidden,), t(weight_norm), eps=1e-5)
    cos_half, sin_half = t(table[positions, :head_dim // 2]), t(table[positions, head_dim // 2:])
    want_q, want_k = (hf_rope((normed @ t(w).T).reshape(tokens, -1, head_dim), cos_half, sin_half) for w in (wq, wk))
    assert_matches(q, want_q)
    assert_matches(new_residual, h)
    assert_matches(k_cache.reshape(-1, kv_heads, head_dim)[slots], want_k)
    assert_matches(v_cache.reshape(-1, kv_heads, head_dim)[slots], (normed @ t(wv).T).reshape(tokens, -1, head_dim))
    with pytest.raises(ValueError, match="QKV projection width 96 != 5 heads"):
        numpy_ops.rms_norm_qkv_rope(x, weight_norm, 1e-5, None, np.concatenate([wq, wk]), None, positions, table,
                                    heads, k_cache, v_cache, slots)


@pytest.mark.parametrize("num_q,seq_len,heads,kv_heads,window", [
    (1, 37, 5, 1, None), (13, 13, 8, 2, None), (6, 40, 6, 3, 9), (40, 40, 4, 4, 1)])
def test_attention_matches_sdpa(rng, num_q, seq_len, heads, kv_heads, window):
    head_dim, scale = 16, 0.3
    q = rng.standard_normal((num_q, heads, head_dim))
    k, v = rng.standard_normal((2, seq_len, kv_heads, head_dim))
    q_pos = np.arange(seq_len - num_q, seq_len)[:, None]
    k_pos = np.arange(seq_len)[None, :]
    visible = (k_pos <= q_pos) & ((k_pos > q_pos - window) if window else True)
    group = heads // kv_heads
    ref = F.scaled_dot_product_attention(
        t(q).transpose(0, 1), t(k).repeat_interleave(group, dim=1).transpose(0, 1),
        t(v).repeat_interleave(group, dim=1).transpose(0, 1),
        attn_mask=torch.from_numpy(visible), scale=scale).transpose(0, 1)
    assert_matches(numpy_ops.attention(q, k, v, scale, window), ref)


def test_topk_softmax_and_scatter_add_match_torch(rng):
    logits = rng.standard_normal((19, 60))
    for renormalize in (False, True):
        weights, ids = numpy_ops.topk_softmax(logits, 4, renormalize)
        ref_w, ref_ids = torch.topk(F.softmax(t(logits), dim=-1), 4, dim=-1)
        if renormalize:
            ref_w = ref_w / ref_w.sum(dim=-1, keepdim=True)
        np.testing.assert_array_equal(ids, ref_ids.numpy())
        assert_matches(weights, ref_w, rtol=1e-6)  # the weights come back as float32
        assert weights.dtype == np.float32 and ids.dtype == np.int32
    out, src = rng.standard_normal((11, 80)), rng.standard_normal((40, 80))
    rows, scale = rng.integers(0, 11, size=40), rng.random(40)
    ref = t(out).index_add(0, torch.from_numpy(rows), t(src) * t(scale)[:, None])
    numpy_ops.scatter_add_rows(out, rows, src, scale)
    assert_matches(out, ref)


# -- sampling ---------------------------------------------------------------

def splitmix64_int(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def test_sampling_rng_is_splitmix64(rng):
    for _ in range(5):
        seed, offset = int(rng.integers(0, 2**64, dtype=np.uint64)), int(rng.integers(0, 2**40))
        base = splitmix64_int((seed + offset * 0x9E3779B97F4A7C15) & MASK64)
        bits = [splitmix64_int((base + i) & MASK64) for i in range(257)]
        # the exact value, rounded once to float32 (as float32 arithmetic does)
        expected = np.array([((b >> 41) + 0.5) / 2**23 for b in bits], dtype=np.float64).astype(np.float32)
        uniform = sampling_rng.uniform(seed, offset, 257)
        assert uniform.dtype == np.float32
        np.testing.assert_array_equal(uniform, expected)
        assert ((uniform > 0) & (uniform < 1)).all()
        np.testing.assert_array_equal(sampling_rng.exponential(seed, offset, 257), -np.log(uniform))


def sampling_params(batch, temperature=1.0, top_k=0, top_p=1.0, seed=1234, offsets=None):
    return dict(temperature=np.full(batch, temperature, np.float32), top_k=np.full(batch, top_k, np.int32),
                top_p=np.full(batch, top_p, np.float32), seeds=np.full(batch, seed, np.uint64),
                offsets=np.arange(batch, dtype=np.int64) if offsets is None else offsets)


def test_greedy_and_top_k_1_are_argmax(rng):
    logits = rng.standard_normal((7, 503)).astype(np.float32)
    np.testing.assert_array_equal(numpy_ops.sample(logits, **sampling_params(7, temperature=0.0)),
                                  np.argmax(logits, axis=-1))
    np.testing.assert_array_equal(numpy_ops.sample(logits, **sampling_params(7, top_k=1)),
                                  np.argmax(logits, axis=-1))


def test_seeded_draw_is_reproducible_and_batch_independent(rng):
    logits = rng.standard_normal((7, 503)).astype(np.float32) * 2
    params = sampling_params(7, temperature=0.9, top_k=50, top_p=0.9,
                             offsets=rng.integers(0, 1000, size=7).astype(np.int64))
    params["seeds"] = rng.integers(0, 2**64, size=7, dtype=np.uint64)
    batched = numpy_ops.sample(logits, **params)
    np.testing.assert_array_equal(numpy_ops.sample(logits, **params), batched)
    for b in range(7):
        alone = numpy_ops.sample(logits[b:b + 1], **{name: p[b:b + 1] for name, p in params.items()})
        assert alone[0] == batched[b]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 8, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 10, 0.7, 0.0), (1.0, 0, 1.0, 0.1)])
def test_sample_frequencies_follow_filtered_softmax(rng, temperature, top_k, top_p, min_p):
    vocab, draws = 23, 20000
    row = (rng.standard_normal(vocab) * 1.5).astype(np.float32)
    logits = np.broadcast_to(row, (draws, vocab))
    seed = int(rng.integers(0, 2**63))
    params = sampling_params(draws, temperature, top_k, top_p, seed)
    tokens = numpy_ops.sample(logits, **params, min_p=np.full(draws, min_p, np.float32))
    counts = np.bincount(tokens, minlength=vocab)

    probs = F.softmax(t(row) / temperature, dim=-1).numpy()
    order = np.argsort(-probs)
    keep = np.zeros(vocab, bool)
    keep[order[: top_k or vocab]] = True  # top-k (no ties among random floats)
    kept_mass = np.where(keep, probs, 0) / np.sum(np.where(keep, probs, 0))
    cum = np.cumsum(kept_mass[order])
    nucleus = order[: int(np.searchsorted(cum, top_p - 1e-9)) + 1]  # shortest prefix reaching top_p
    keep &= np.isin(np.arange(vocab), nucleus)
    keep &= probs >= min_p * probs.max()
    expected = np.where(keep, probs, 0) / np.sum(np.where(keep, probs, 0)) * draws

    assert counts[~keep].sum() == 0, f"tokens outside top-k / top-p drawn: {np.flatnonzero(counts * ~keep)}"
    cells = expected >= 5
    chi2 = np.sum((counts[cells] - expected[cells]) ** 2 / expected[cells])
    dof = max(int(cells.sum()) - 1, 1)
    # The chi-square test's p-value (its survival function): a correct sampler fails 1e-6 of runs.
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                            torch.tensor(chi2 / 2, dtype=torch.float64)))
    assert p_value > 1e-6, f"chi-square {chi2:.1f} for {dof} degrees of freedom (p = {p_value:.2g})"


def test_filter_probs_keeps_ties_at_the_threshold():
    probs = np.array([0.1, 0.3, 0.2, 0.3, 0.1], np.float32)
    np.testing.assert_array_equal(numpy_ops.filter_probs(probs, 1, 1.0) > 0, [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(numpy_ops.filter_probs(probs, 3, 1.0) > 0, [0, 1, 1, 1, 0])
    np.testing.assert_array_equal(numpy_ops.filter_probs(probs, 0, 0.5) > 0, [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(numpy_ops.filter_probs(probs, 0, 0.0) > 0, [0, 1, 0, 1, 0])


# (seed, offset) whose uniform at index 20 was exactly 1.0 (E = 0) when the
# generator used 24 bits, which let filtered tokens win as 0 / 0.
_SEED, _OFFSET, _INDEX = 0, 476788, 20


def test_filtered_tokens_never_win():
    assert sampling_rng.uniform(_SEED, _OFFSET, _INDEX + 1)[_INDEX] < 1.0
    logits = np.zeros((1, _INDEX + 1), np.float32)
    logits[0, 0] = 5.0  # top_k=1 keeps token 0 alone
    params = sampling_params(1, top_k=1, seed=_SEED, offsets=np.array([_OFFSET], np.int64))
    with np.errstate(invalid="raise"):
        assert numpy_ops.sample(logits, **params)[0] == 0


def test_gpu_fast_paths_are_on_unless_named_off(monkeypatch):
    from shardline.kernels.backend import gpu_paths_off
    monkeypatch.delenv("SHARDLINE_GPU_OFF", raising=False)
    assert gpu_paths_off() == frozenset()
    monkeypatch.setenv("SHARDLINE_GPU_OFF", "flash, nccl_links")
    assert gpu_paths_off() == {"flash", "nccl_links"}
    monkeypatch.setenv("SHARDLINE_GPU_OFF", "flash,bogus")
    with pytest.raises(ValueError, match="SHARDLINE_GPU_OFF: unknown \\['bogus'\\]"):
        gpu_paths_off()
