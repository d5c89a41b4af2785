"""NumPy reference for every kernel: the meaning of each op, on host arrays.

The CUDA module (`cuda_ops.py`) has the same functions with the same
signatures; tests hold it to these. Everything here computes in the dtype of
its inputs (float32 in the engine, float64 in reference tests) and must stay
plain, readable NumPy: no tricks that would make it a second implementation
to debug.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from shardline.kernels import sampling_rng

name = "numpy"


def embedding(weight: np.ndarray, ids: np.ndarray) -> np.ndarray:
    # weight [vocab, hidden], ids [num_tokens] -> [num_tokens, hidden]
    return weight[ids]


def vocab_embedding(weight: np.ndarray, ids: np.ndarray, start: int) -> np.ndarray:
    """A vocab-parallel shard: rows for ids in [start, start + len(weight)),
    zeros for the ids other ranks hold. weight [rows, hidden], ids [T]."""
    local = ids - start
    inside = (local >= 0) & (local < weight.shape[0])
    return np.where(inside[:, None], weight[np.where(inside, local, 0)], 0).astype(weight.dtype)


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    # x [num_tokens, in], weight [out, in] (torch layout), bias [out]
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    return y


def sums_into_residual(x: np.ndarray, weight: np.ndarray) -> bool:
    """Whether RowParallelLinear.add_to sums this projection into the residual (linear_add):
    always here; CudaOps not for every GEMM."""
    return True


def linear_add(x: np.ndarray, weight: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """residual + linear(x, weight), written into residual's memory (as CUDA's GEMM sums it:
    the caller hands residual over), residual [..., out] shaped as linear's output."""
    check_linear_add(x, weight, residual)
    return np.add(residual, x @ weight.T, out=residual)


def check_linear_add(x, weight, residual) -> None:
    """linear_add's residual: linear's output shape, contiguous, x's dtype."""
    want = tuple(x.shape[:-1]) + (weight.shape[0],)
    if tuple(residual.shape) != want or not residual.flags.c_contiguous or residual.dtype != x.dtype:
        raise ValueError(f"linear_add: residual {residual.dtype}{tuple(residual.shape)} must be a contiguous "
                         f"{x.dtype}{want}")


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


def rms_norm(x, weight, eps: float, residual=None):
    """RMSNorm of x (or of x + residual). With a residual, returns
    (normed, x + residual) so the caller keeps the new residual stream."""
    h = x if residual is None else x + residual
    # [num_tokens, hidden]
    y = (h * inv_rms(h, eps)).astype(x.dtype) * weight
    return y if residual is None else (y, h)


def inv_rms(h, eps: float):
    """1 / rms of each row of h [..., hidden], eps inside the root: [..., 1]."""
    return 1.0 / np.sqrt(np.mean(np.square(h), axis=-1, keepdims=True) + eps)


def layer_norm(x, weight, bias, eps: float, residual=None):
    """LayerNorm of x (or of x + residual); same return convention as rms_norm."""
    h = x if residual is None else x + residual
    mean = np.mean(h, axis=-1, keepdims=True)
    var = np.mean(np.square(h - mean), axis=-1, keepdims=True)
    y = ((h - mean) / np.sqrt(var + eps)).astype(x.dtype) * weight + bias
    return y if residual is None else (y, h)


def rope(q: np.ndarray, k: np.ndarray, positions: np.ndarray, cos_sin: np.ndarray):
    """Rotate-half (GPT-NeoX / HF Llama) rotary embedding.

    q [num_tokens, num_heads, head_dim], k [num_tokens, num_kv_heads, head_dim],
    positions [num_tokens], cos_sin [max_positions, head_dim]: cos in the first
    half, sin in the second (see rope.py). Returns new (q, k).
    """
    half = cos_sin.shape[1] // 2
    cos = cos_sin[positions, :half][:, None, :].astype(q.dtype)  # [T, 1, half]
    sin = cos_sin[positions, half:][:, None, :].astype(q.dtype)

    def rotate(x):
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    return rotate(q), rotate(k)


def silu_and_mul(x: np.ndarray, rms_of=None, eps: float = 0.0) -> np.ndarray:
    """x [num_tokens, 2 * inter]: gate then up -> [num_tokens, inter]. rms_of [num_tokens,
    hidden]: gate and up first times 1 / rms of its rows (the RMSNorm before a GEMM whose
    weight holds the norm's)."""
    if rms_of is not None:
        x = x * inv_rms(rms_of, eps).astype(x.dtype)
    gate, up = np.split(x, 2, axis=-1)
    return gate / (1.0 + np.exp(-gate)) * up


def gated_linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """silu_and_mul(linear(x, weight, bias)): the gate and up projections in one weight
    [2 * inter, in] (fused into one kernel on CUDA for decode-sized x)."""
    return silu_and_mul(linear(x, weight, bias))


def expert_linear(x: np.ndarray, weights: np.ndarray, experts, gated: bool = False) -> np.ndarray:
    """The few-token path of an MoE layer: pair p of experts [P] (a whole number times x's R rows)
    -> linear (gated: gated_linear) of x[p % R] by weights[experts[p]] ([E, out, in]; an id out
    of range takes the nearest expert): [P, out (gated: out / 2)]. Only the chosen experts are
    read (on CUDA with no host sync)."""
    experts = np.clip(np.asarray(experts).reshape(-1), 0, weights.shape[0] - 1)
    if not x.shape[0] or experts.size % x.shape[0]:
        raise ValueError(f"expert_linear: {experts.size} pairs for {x.shape[0]} rows")
    rows = x[np.arange(experts.size) % x.shape[0]]
    product = gated_linear if gated else linear
    return np.concatenate([product(rows[p:p + 1], weights[e]) for p, e in enumerate(experts)])


def expert_mlp_applies(x: np.ndarray, gate_up: np.ndarray, down: np.ndarray) -> bool:
    """Whether expert_linear runs x by gate/up, then by down: always here (CudaOps: skinny GEMMs)."""
    return True


def capturing() -> bool:
    """Whether the ops are being captured into a CUDA graph: never here."""
    return False


def rms_norm_linear(x, norm_weight, eps: float, residual, weight, bias=None, gated: bool = False, ops=None,
                    folded: bool = False):
    """(linear(rms_norm(x (+ residual))), the new residual stream: x + residual, or x itself
    without a residual); gated: gated_linear. One kernel on CUDA for decode-sized x; `ops`
    runs this composition on another op set (CUDA's inputs it does not fuse). folded: the norm's
    weight is all ones, its values held by weight's columns (models/layers.py Norm), so CUDA may
    leave the norm to the op after the GEMM; the same values here."""
    ops = ops or sys.modules[__name__]
    normed, residual = rms_norm_residual(x, norm_weight, eps, residual, ops)
    return (ops.gated_linear if gated else ops.linear)(normed, weight, bias), residual


def rms_norm_residual(x, norm_weight, eps: float, residual, ops=None):
    """(rms_norm(x (+ residual)), the new residual stream: x + residual, or x itself without
    one), on `ops` (this module by default)."""
    ops = ops or sys.modules[__name__]
    if residual is None:
        return ops.rms_norm(x, norm_weight, eps), x
    return ops.rms_norm(x, norm_weight, eps, residual)


def rms_norm_qkv_rope(x, norm_weight, eps: float, residual, weight, bias, positions, cos_sin, num_heads: int,
                      k_cache, v_cache, slot_mapping, ops=None, folded: bool = False):
    """An attention block's start over the paged cache: the QKV projection [T, (heads + 2
    kv_heads) * head_dim] of rms_norm(x (+ residual)) split into q, k, v, then
    rope_write_kv. Returns (the rotated q [T, heads, head_dim], the new residual stream).
    One kernel on CUDA for decode-sized x; `ops` and folded as in rms_norm_linear."""
    ops = ops or sys.modules[__name__]
    qkv, residual = ops.rms_norm_linear(x, norm_weight, eps, residual, weight, bias)
    q, k, v = split_qkv(qkv, num_heads, k_cache)
    return ops.rope_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping), residual


def split_qkv(qkv, num_heads: int, k_cache) -> tuple:
    """Views q [T, heads, head_dim], k and v [T, kv_heads, head_dim] of a QKV projection's
    columns, the KV heads and head size from the cache [blocks, block_size, kv_heads, head_dim]."""
    tokens, (kv_heads, head_dim) = qkv.shape[0], k_cache.shape[2:]
    q_size, kv_size = num_heads * head_dim, kv_heads * head_dim
    if qkv.shape[1] != q_size + 2 * kv_size:
        raise ValueError(f"QKV projection width {qkv.shape[1]} != {num_heads} heads + 2 x {kv_heads} kv heads "
                         f"of {head_dim}")
    q = qkv[:, :q_size].reshape(tokens, num_heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].reshape(tokens, kv_heads, head_dim)
    v = qkv[:, q_size + kv_size:].reshape(tokens, kv_heads, head_dim)
    return q, k, v


def gelu(x: np.ndarray, approximate: str = "tanh") -> np.ndarray:
    if approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        return 0.5 * x * (1.0 + np.tanh(c * (x + 0.044715 * x**3)))
    if approximate == "none":
        erf = np.vectorize(math.erf, otypes=[np.float64])
        return (0.5 * x * (1.0 + erf(x.astype(np.float64) / math.sqrt(2.0)))).astype(x.dtype)
    raise ValueError(f"gelu approximate must be 'tanh' or 'none', got {approximate!r}")


def softmax(x: np.ndarray) -> np.ndarray:
    # along the last axis, in float32 at least
    x = x.astype(np.promote_types(x.dtype, np.float32))
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def attention(q, k, v, scale: float, sliding_window: int | None = None):
    """Causal attention for one sequence with grouped-query heads.

    q [num_query_tokens, num_heads, head_dim] are the last query tokens of the
    sequence; k, v [seq_len, num_kv_heads, head_dim] hold every token so far
    (the queries' own keys included). Query i sits at position
    seq_len - num_query_tokens + i and sees keys at positions <= its own
    (and > its own - sliding_window when a window is given).
    """
    num_q, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = np.repeat(k, group, axis=1)  # [S, H, D]
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) * scale  # [H, T, S]
    q_pos = np.arange(seq_len - num_q, seq_len)[:, None]
    k_pos = np.arange(seq_len)[None, :]
    visible = k_pos <= q_pos
    if sliding_window is not None:
        visible &= k_pos > q_pos - sliding_window
    scores = np.where(visible[None], scores, -np.inf)
    probs = softmax(scores).astype(q.dtype)
    return np.einsum("hts,shd->thd", probs, v)


def topk_softmax(router_logits: np.ndarray, top_k: int, renormalize: bool):
    """MoE gating: softmax over experts, keep the top_k per token.

    router_logits [num_tokens, num_experts] -> (weights [num_tokens, top_k]
    float32, expert_ids [num_tokens, top_k] int32), highest weight first.
    """
    probs = softmax(router_logits)
    ids = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(probs, ids, axis=-1)
    if renormalize:
        weights = weights / np.sum(weights, axis=-1, keepdims=True)
    return weights.astype(np.float32), ids.astype(np.int32)


def index_rows(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    # x [n, hidden], rows [m] -> [m, hidden]
    return x[rows]


def scatter_add_rows(out: np.ndarray, rows: np.ndarray, src: np.ndarray, scale: np.ndarray) -> None:
    """out[rows[i]] += scale[i] * src[i], in place (rows may repeat)."""
    np.add.at(out, rows, (src * scale[:, None]).astype(out.dtype))


def filter_probs(probs: np.ndarray, top_k: int, top_p: float, min_p: float = 0.0) -> np.ndarray:
    """Zero every probability outside the top-k, then outside the top-p
    nucleus of what is left (renormalised), then below min_p times the
    largest. Ties at a threshold are kept.
    probs [vocab] float32 -> [vocab] (not renormalised)."""
    vocab = probs.shape[0]
    if 0 < top_k < vocab:
        kth = np.partition(probs, vocab - top_k)[vocab - top_k]
        probs = np.where(probs >= kth, probs, 0.0).astype(probs.dtype)
    if top_p < 1.0:
        desc = np.sort(probs)[::-1]
        cum = np.cumsum(desc / np.sum(desc))
        cut = min(int(np.searchsorted(cum, np.float32(top_p))), vocab - 1)
        probs = np.where(probs >= desc[cut], probs, 0.0).astype(probs.dtype)
    if min_p > 0.0:
        probs = np.where(probs >= np.float32(min_p) * np.max(probs), probs, 0.0).astype(probs.dtype)
    return probs


def sample(logits, temperature, top_k, top_p, seeds, offsets, min_p=None):
    """One token per row.

    logits [batch, vocab]; temperature [batch] float32 (0 means greedy);
    top_k [batch] int32 (0 means off); top_p [batch] float32 (1 means off);
    min_p [batch] float32 or None (0 means off);
    seeds [batch] uint64 and offsets [batch] int64 (the request's output
    index): the noise for row b depends only on (seeds[b], offsets[b]), so a
    request samples the same tokens whatever batch it runs in.
    Sampling is the exponential race: argmax_i p_i / E_i with E_i ~ Exp(1),
    which draws i with probability p_i.
    """
    batch, vocab = logits.shape
    out = np.empty(batch, dtype=np.int32)
    for b in range(batch):
        row = logits[b].astype(np.float32)
        if temperature[b] == 0:
            out[b] = int(np.argmax(row))
            continue
        probs = softmax(row / np.float32(temperature[b]))
        probs = filter_probs(probs, int(top_k[b]), float(top_p[b]), 0.0 if min_p is None else float(min_p[b]))
        noise = sampling_rng.exponential(int(seeds[b]), int(offsets[b]), vocab)
        out[b] = int(np.argmax(probs / noise))
    return out


def upload(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # host arrays -> fresh arrays the caller may write (CudaOps: on the device, in one copy)
    return {name: np.array(array) for name, array in arrays.items()}


# -- paged KV cache ------------------------------------------------------------------
# k_cache / v_cache: [num_blocks, block_size_tokens, num_kv_heads, head_dim];
# a token's slot is block_id * block_size_tokens + offset in the block.


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Store this step's K/V (each [num_tokens, num_kv_heads, head_dim]) at their slots, in place."""
    num_blocks, block_size = k_cache.shape[:2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    k_cache[blocks, offsets] = k
    v_cache[blocks, offsets] = v


def rope_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, rms_of=None, eps: float = 0.0):
    """RoPE on q and k, then k/v into the cache; returns the rotated q. rms_of [num_tokens,
    hidden]: q, k and v first times 1 / rms of its rows (as silu_and_mul's).
    (One fused kernel on CUDA; here the two reference ops in sequence.)"""
    if rms_of is not None:
        scale = inv_rms(rms_of, eps).astype(q.dtype)[:, :, None]   # [T, 1, 1]
        q, k, v = q * scale, k * scale, v * scale
    q, k = rope(q, k, positions, cos_sin)
    write_kv(k, v, k_cache, v_cache, slot_mapping)
    return q


def copy_blocks(k_cache, v_cache, block_copies) -> None:
    """Copy-on-write: block_copies [C, 2] (src, dst), in place."""
    for src, dst in block_copies:
        k_cache[dst] = k_cache[src]
        v_cache[dst] = v_cache[src]


def gather_cache_rows(caches, slots):
    """caches: C equal [num_blocks, block_size, kv_heads, head_dim] arrays; slots [S]
    -> their rows [C, S, kv_heads, head_dim]."""
    return np.stack([c.reshape(-1, *c.shape[2:])[np.asarray(slots)] for c in caches])


def scatter_cache_rows(caches, slots, rows) -> None:
    """rows [C, S, kv_heads, head_dim] into the caches at `slots`, in place."""
    for cache, part in zip(caches, rows):
        cache.reshape(-1, *cache.shape[2:])[np.asarray(slots)] = part


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale: float,
                    sliding_window: int | None = None, one_query_each: bool = False):
    """Causal attention for a batch of sequences whose K/V live in paged blocks.

    q [num_tokens, num_heads, head_dim] holds each request's new tokens back
    to back (request b: rows query_start_loc[b] .. query_start_loc[b+1]);
    those are the last tokens of its seq_lens[b] tokens, all already written
    to the cache. Covers prefill, chunked prefill over a cached prefix and
    decode (one query per request) alike. Returns [num_tokens, num_heads, head_dim].
    one_query_each promises that query_start_loc is 0, 1, ..., B (a decode step's),
    which lets the CUDA kernel skip its tile lookup; here it is checked.
    """
    if one_query_each and not np.array_equal(np.asarray(query_start_loc), np.arange(len(seq_lens) + 1)):
        raise ValueError("paged_attention: one_query_each needs query_start_loc = 0, 1, ..., B; "
                         f"got {np.asarray(query_start_loc).tolist()}")
    block_size = k_cache.shape[1]
    out = np.empty_like(q)
    for b in range(len(seq_lens)):
        start, end, seq_len = int(query_start_loc[b]), int(query_start_loc[b + 1]), int(seq_lens[b])
        if end == start:
            continue
        pos = np.arange(seq_len)
        blocks = block_tables[b, pos // block_size]
        k = k_cache[blocks, pos % block_size]  # [seq_len, kv_heads, head_dim]
        v = v_cache[blocks, pos % block_size]
        out[start:end] = attention(q[start:end], k, v, scale, sliding_window)
    return out


def apply_penalties(logits, prompt_ids, prompt_lens, output_ids, output_lens,
                    repetition, presence, frequency):
    """Repetition penalty over prompt and output tokens (positive logits
    divided, negative multiplied); presence and frequency penalties over
    output tokens (logit -= frequency * count + presence * [count > 0]).
    logits [S, vocab] float32; id arrays padded past their lengths. Returns new logits."""
    logits = logits.astype(np.float32, copy=True)
    vocab = logits.shape[1]
    for s in range(logits.shape[0]):
        counts = np.bincount(output_ids[s, :output_lens[s]], minlength=vocab)
        seen = counts > 0
        seen[prompt_ids[s, :prompt_lens[s]]] = True
        row = logits[s]
        penalised = np.where(row > 0, row / repetition[s], row * repetition[s])
        row = np.where(seen, penalised, row)
        logits[s] = row - frequency[s] * counts - presence[s] * (counts > 0)
    return logits
