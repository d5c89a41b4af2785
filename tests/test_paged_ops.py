"""Paged-KV reference ops: paged attention equals attention over the same
keys laid out contiguously (checked against torch SDPA in float64), for
random block tables, mixed prefill / chunked prefill / decode batches;
penalties against HF's logits processors."""

from __future__ import annotations

import numpy as np
import pytest

from shardline.kernels import numpy_ops as ops

torch = pytest.importorskip("torch")


def sdpa_reference(q, k, v, scale):
    """Causal SDPA for queries that are the last rows of the sequence (float64)."""
    num_q, seq_len = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    qt = torch.from_numpy(q).permute(1, 0, 2)
    kt = torch.from_numpy(np.repeat(k, group, axis=1)).permute(1, 0, 2)
    vt = torch.from_numpy(np.repeat(v, group, axis=1)).permute(1, 0, 2)
    mask = torch.arange(seq_len)[None, :] <= torch.arange(seq_len - num_q, seq_len)[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    return out.permute(1, 0, 2).numpy()


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_attention_matches_contiguous(block_size):
    rng = np.random.default_rng()
    heads, kv_heads, head_dim = 6, 2, 16
    seq_lens = np.array([1, 37, 5, 64, 20], dtype=np.int32)
    new_tokens = np.array([1, 37, 1, 13, 7], dtype=np.int32)  # decode, prefill, decode, chunk, chunk
    blocks_per_seq = -(-seq_lens // block_size)
    num_blocks = int(blocks_per_seq.sum()) + 3
    perm = rng.permutation(num_blocks)
    tables = np.zeros((len(seq_lens), blocks_per_seq.max()), dtype=np.int32)
    k_cache = rng.standard_normal((num_blocks, block_size, kv_heads, head_dim))
    v_cache = rng.standard_normal((num_blocks, block_size, kv_heads, head_dim))
    qsl = np.concatenate([[0], np.cumsum(new_tokens)]).astype(np.int32)
    q = rng.standard_normal((int(qsl[-1]), heads, head_dim))
    used = 0
    expected = np.empty_like(q)
    for b, seq_len in enumerate(seq_lens):
        tables[b, :blocks_per_seq[b]] = perm[used:used + blocks_per_seq[b]]
        used += blocks_per_seq[b]
        pos = np.arange(seq_len)
        k = k_cache[tables[b, pos // block_size], pos % block_size]
        v = v_cache[tables[b, pos // block_size], pos % block_size]
        expected[qsl[b]:qsl[b + 1]] = sdpa_reference(q[qsl[b]:qsl[b + 1]], k, v, 0.25)
    out = ops.paged_attention(q, k_cache, v_cache, tables, seq_lens, qsl, 0.25)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
    # a promise of one query a sequence (a decode step's) that these inputs break is refused
    with pytest.raises(ValueError, match="one_query_each needs query_start_loc = 0, 1, ..., B; got"):
        ops.paged_attention(q, k_cache, v_cache, tables, seq_lens, qsl, 0.25, one_query_each=True)
    decode = np.arange(len(seq_lens) + 1, dtype=np.int32)
    out = ops.paged_attention(q[:len(seq_lens)], k_cache, v_cache, tables, seq_lens, decode, 0.25,
                              one_query_each=True)
    np.testing.assert_allclose(out, ops.paged_attention(q[:len(seq_lens)], k_cache, v_cache, tables, seq_lens,
                                                        decode, 0.25), rtol=0, atol=0)


def test_write_kv_and_copy_blocks():
    rng = np.random.default_rng()
    k_cache, v_cache = np.zeros((6, 4, 2, 8)), np.zeros((6, 4, 2, 8))
    k, v = rng.standard_normal((5, 2, 8)), rng.standard_normal((5, 2, 8))
    slots = np.array([0, 1, 2, 3, 21])  # block 0 full, block 5 offset 1
    ops.write_kv(k, v, k_cache, v_cache, slots)
    np.testing.assert_array_equal(k_cache[0], k[:4])
    np.testing.assert_array_equal(v_cache[5, 1], v[4])
    ops.copy_blocks(k_cache, v_cache, np.array([[0, 3]]))
    np.testing.assert_array_equal(k_cache[3], k_cache[0])
    np.testing.assert_array_equal(v_cache[3], v_cache[0])


def test_gather_and_scatter_cache_rows():
    rng = np.random.default_rng()
    caches = [rng.standard_normal((6, 4, 2, 8)) for _ in range(3)]
    slots = rng.permutation(24)[:7]
    rows = ops.gather_cache_rows(caches, slots)
    assert rows.shape == (3, 7, 2, 8)
    for c, cache in enumerate(caches):
        for i, slot in enumerate(slots):
            np.testing.assert_array_equal(rows[c, i], cache[slot // 4, slot % 4])
    targets = [np.zeros_like(c) for c in caches]
    ops.scatter_cache_rows(targets, slots, rows)
    for cache, target in zip(caches, targets):
        written = np.zeros(24, dtype=bool)
        written[slots] = True
        np.testing.assert_array_equal(target.reshape(24, 2, 8)[written], cache.reshape(24, 2, 8)[written])
        assert not target.reshape(24, 2, 8)[~written].any()


def test_penalties_match_hf_processors():
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng()
    vocab = 50
    logits = rng.standard_normal((3, vocab)).astype(np.float32) * 3
    prompt = [rng.integers(0, vocab, n) for n in (5, 1, 9)]
    output = [rng.integers(0, vocab, n) for n in (7, 0, 3)]

    def pad(rows):
        width = max(len(r) for r in rows)
        return np.array([np.pad(r, (0, width - len(r))) for r in rows], dtype=np.int32)

    rep = np.array([1.3, 1.0, 0.7], dtype=np.float32)
    zeros = np.zeros(3, dtype=np.float32)
    ours = ops.apply_penalties(logits, pad(prompt), np.array([5, 1, 9]), pad(output), np.array([7, 0, 3]),
                               rep, zeros, zeros)
    for s in range(3):
        history = torch.from_numpy(np.concatenate([prompt[s], output[s]]).astype(np.int64))[None]
        ref = transformers.RepetitionPenaltyLogitsProcessor(float(rep[s]))(history, torch.from_numpy(logits[s:s + 1]))
        np.testing.assert_allclose(ours[s], ref[0].numpy(), rtol=1e-6)
    presence, frequency = np.array([0.5, 0.2, -0.4], np.float32), np.array([0.1, 0.0, 0.3], np.float32)
    ours = ops.apply_penalties(logits, pad(prompt), np.array([5, 1, 9]), pad(output), np.array([7, 0, 3]),
                               np.ones(3, np.float32), presence, frequency)
    for s in range(3):
        counts = np.bincount(output[s], minlength=vocab).astype(np.float64)
        expected = logits[s] - frequency[s] * counts - presence[s] * (counts > 0)
        np.testing.assert_allclose(ours[s], expected, rtol=1e-6)


def test_min_p_keeps_tokens_near_the_max():
    probs = np.array([0.5, 0.3, 0.1, 0.06, 0.04], dtype=np.float32)
    kept = ops.filter_probs(probs, 0, 1.0, min_p=0.2)  # threshold 0.1
    np.testing.assert_array_equal(kept > 0, [True, True, True, False, False])
