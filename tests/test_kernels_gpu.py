"""CudaOps against the NumPy reference, on a GPU.

Each op runs on fresh random inputs (the seed is printed, so a failure can be
replayed) in float32, bfloat16 and float16; the reference is numpy_ops in
float64 on the very inputs the GPU saw (rounded to the storage dtype).
Every new CuPy allocation is poisoned with NaN bytes first, so an output
element a kernel forgets to write fails the comparison. Skipped without
CuPy or a GPU.
"""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest

from gpu_guard import cupy  # noqa: E402  (skips the module without a GPU)

pytestmark = pytest.mark.gpu

from shardline.kernels import numpy_ops  # noqa: E402
from shardline.kernels.cuda_common import _SKINNY_MAX_ROWS  # noqa: E402
from shardline.kernels.cuda_ops import CudaOps  # noqa: E402
from shardline.kernels.cuda_skinny import skinny_large_bytes_for  # noqa: E402
from shardline.kernels.rope import rope_cos_sin  # noqa: E402

TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}
DTYPES = list(TOLERANCE)


@pytest.fixture(scope="module")
def ops():
    ops = CudaOps(0)
    assert ops.skinny_large_bytes == skinny_large_bytes_for(ops.device_name)
    assert ops.skinny_max_rows == _SKINNY_MAX_ROWS
    ops.skinny_large_bytes = None   # the kernel tests run every row count the kernels are built for
    return ops


@pytest.fixture
def rng():
    seed = int(np.random.SeedSequence().entropy % 2**63)
    print(f"random seed {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def poisoned_allocations():
    pool = cupy.get_default_memory_pool()

    def malloc(size):
        mem = pool.malloc(size)
        if size:  # 0xFF bytes: NaN in every float dtype, -1 in ints
            cupy.cuda.runtime.memsetAsync(mem.ptr, 0xFF, size, cupy.cuda.get_current_stream().ptr)
        return mem

    cupy.cuda.set_allocator(malloc)
    yield
    cupy.cuda.set_allocator(pool.malloc)


def on_device(ops, host, dtype):
    """(device array, float64 copy of exactly what the device holds)."""
    dev = ops.from_float(np.asarray(host, dtype=np.float64), dtype)
    return dev, ops.to_host(dev).astype(np.float64)


def random_input(ops, rng, shape, dtype, scale=1.0):
    return on_device(ops, rng.standard_normal(shape) * scale, dtype)


def assert_close(ops, out, ref, dtype, what):
    got = ops.to_host(out).astype(np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    assert np.isfinite(got).all(), f"{what}: non-finite output (an element left unwritten?)"
    err = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)
    assert err <= TOLERANCE[dtype], f"{what} {dtype}: relative error {err:.3g}"


def test_bf16_conversion_rounds_to_nearest_even(ops, rng):
    torch = pytest.importorskip("torch")
    host = np.concatenate([rng.standard_normal(1000).astype(np.float32) * 100,
                           np.float32([0.0, -0.0, np.inf, -np.inf, 3.0e38, 1e-40, 1.00390625, 1.01171875])])
    bits = cupy.asnumpy(ops.from_float(host, "bfloat16"))
    expected = torch.from_numpy(host).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bits, expected)
    back = ops.to_host(ops.from_float(host, "bfloat16"))
    np.testing.assert_array_equal(back, torch.from_numpy(expected.view(np.int16)).view(torch.bfloat16).float().numpy())
    assert np.isnan(ops.to_host(ops.from_float(np.float32([np.nan]), "bfloat16"))).all()
    for dtype in ("float16", "float32"):
        out = ops.to_host(ops.from_float(host[:1000], dtype))
        np.testing.assert_array_equal(out, host[:1000].astype(dtype).astype(np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_and_index_rows(ops, rng, dtype):
    weight, weight64 = random_input(ops, rng, (503, 80), dtype)
    ids = rng.integers(0, 503, size=37)
    for id_dtype in (np.int32, np.int64):
        out = ops.embedding(weight, cupy.asarray(ids.astype(id_dtype)))
        np.testing.assert_array_equal(ops.to_host(out), numpy_ops.embedding(weight64, ids).astype(np.float32))
    out_of_range = ops.embedding(weight, cupy.asarray([502, 503, -1]))  # no host check: zero rows
    assert not ops.to_host(out_of_range[1:]).any() and ops.to_host(out_of_range[0]).any()
    rows = rng.integers(0, 503, size=(3, 5))
    np.testing.assert_array_equal(ops.to_host(ops.index_rows(weight, cupy.asarray(rows))),
                                  numpy_ops.index_rows(weight64, rows).astype(np.float32))
    ints = cupy.arange(12 * 3, dtype=cupy.int32).reshape(12, 3)  # any dtype moves bit for bit
    np.testing.assert_array_equal(cupy.asnumpy(ops.index_rows(ints, cupy.asarray([11, 0, 11]))),
                                  cupy.asnumpy(ints)[[11, 0, 11]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,k,n", [(1, 80, 48), (33, 257, 129), (7, 4096, 14336)])
def test_linear(ops, rng, dtype, tokens, k, n):
    x, x64 = random_input(ops, rng, (tokens, k), dtype)
    w, w64 = random_input(ops, rng, (n, k), dtype, scale=1 / math.sqrt(k))
    b, b64 = random_input(ops, rng, (n,), dtype)
    assert_close(ops, ops.linear(x, w), numpy_ops.linear(x64, w64), dtype, "linear")
    assert_close(ops, ops.linear(x, w, b), numpy_ops.linear(x64, w64, b64), dtype, "linear+bias")
    res, res64 = random_input(ops, rng, (tokens, n), dtype)
    summed = ops.linear_add(x, w, res)
    assert summed.data.ptr == res.data.ptr   # summed in the residual's memory
    assert_close(ops, summed, numpy_ops.linear_add(x64, w64, res64), dtype, "linear_add")
    for bad in (res[:, :-1], res[:, 0], res.astype(cupy.float32 if dtype != "float32" else cupy.float16)):
        with pytest.raises(ValueError, match="residual"):
            ops.linear_add(x, w, bad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_silu_gelu(ops, rng, dtype):
    a, a64 = random_input(ops, rng, (7, 3, 80), dtype)
    b, b64 = random_input(ops, rng, (7, 3, 80), dtype)
    row, row64 = random_input(ops, rng, (80,), dtype)
    assert_close(ops, ops.add(a, b), numpy_ops.add(a64, b64), dtype, "add")
    assert_close(ops, ops.add(a, row), numpy_ops.add(a64, row64), dtype, "add broadcast")
    for rows, inter in ((9, 77), (4, 80), (3, 14336)):   # 16-bit types with inter % 8 == 0: 16-byte vectors
        gate_up, gate_up64 = random_input(ops, rng, (rows, 2 * inter), dtype, scale=3.0)
        assert_close(ops, ops.silu_and_mul(gate_up), numpy_ops.silu_and_mul(gate_up64), dtype, "silu_and_mul")
    for approximate in ("tanh", "none"):
        assert_close(ops, ops.gelu(a, approximate), numpy_ops.gelu(a64, approximate), dtype, f"gelu {approximate}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [77, 80, 4096, 20000])   # RMSNorm of 16-bit rows, hidden % 8 == 0: vectors
def test_norms(ops, rng, dtype, hidden):
    x, x64 = random_input(ops, rng, (5, hidden), dtype, scale=2.0)
    res, res64 = random_input(ops, rng, (5, hidden), dtype)
    w, w64 = on_device(ops, 1.0 + 0.1 * rng.standard_normal(hidden), dtype)
    b, b64 = random_input(ops, rng, (hidden,), dtype, scale=0.1)
    assert_close(ops, ops.rms_norm(x, w, 1e-6), numpy_ops.rms_norm(x64, w64, 1e-6), dtype, "rms_norm")
    out, new_res = ops.rms_norm(x, w, 1e-6, residual=res)
    ref, ref_res = numpy_ops.rms_norm(x64, w64, 1e-6, residual=res64)
    assert_close(ops, out, ref, dtype, "rms_norm fused")
    assert_close(ops, new_res, ref_res, dtype, "rms_norm residual")
    assert_close(ops, ops.layer_norm(x, w, b, 1e-5), numpy_ops.layer_norm(x64, w64, b64, 1e-5), dtype, "layer_norm")
    out, new_res = ops.layer_norm(x, w, b, 1e-5, residual=res)
    ref, ref_res = numpy_ops.layer_norm(x64, w64, b64, 1e-5, residual=res64)
    assert_close(ops, out, ref, dtype, "layer_norm fused")
    assert_close(ops, new_res, ref_res, dtype, "layer_norm residual")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope(ops, rng, dtype):
    table = rope_cos_sin(64, 4096, 10000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 1024})
    table32 = table.astype(np.float32)
    q, q64 = random_input(ops, rng, (9, 5, 64), dtype)
    k, k64 = random_input(ops, rng, (9, 1, 64), dtype)
    positions = rng.integers(0, 4096, size=9)
    q_out, k_out = ops.rope(q, k, cupy.asarray(positions), cupy.asarray(table32))
    q_ref, k_ref = numpy_ops.rope(q64, k64, positions, table32.astype(np.float64))
    assert_close(ops, q_out, q_ref, dtype, "rope q")
    assert_close(ops, k_out, k_ref, dtype, "rope k")


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_and_topk(ops, rng, dtype):
    x, x64 = random_input(ops, rng, (3, 4, 503), dtype, scale=4.0)
    out = ops.softmax(x)
    assert out.dtype == cupy.float32
    assert_close(ops, out, numpy_ops.softmax(x64), dtype, "softmax")
    for num_experts, top_k in ((60, 4), (8, 2), (128, 8)):
        logits, logits64 = random_input(ops, rng, (19, num_experts), dtype)
        for renormalize in (False, True):
            weights, ids = ops.topk_softmax(logits, top_k, renormalize)
            ref_w, ref_ids = numpy_ops.topk_softmax(logits64, top_k, renormalize)
            np.testing.assert_array_equal(cupy.asnumpy(ids), ref_ids)
            assert weights.dtype == cupy.float32
            assert_close(ops, weights, ref_w.astype(np.float64), dtype, "topk_softmax")


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_add_rows(ops, rng, dtype):
    out, out64 = random_input(ops, rng, (11, 80), dtype)
    rows = rng.integers(0, 11, size=40)  # repeats
    src, src64 = random_input(ops, rng, (40, 80), dtype)
    scale = rng.random(40).astype(np.float32)
    ops.scatter_add_rows(out, cupy.asarray(rows), src, cupy.asarray(scale))
    numpy_ops.scatter_add_rows(out64, rows, src64, scale.astype(np.float64))
    assert_close(ops, out, out64, dtype, "scatter_add_rows")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_q,seq_len,heads,kv_heads,head_dim,window", [
    (1, 37, 5, 1, 80, None),      # decode, odd sizes, MQA
    (13, 13, 8, 2, 128, None),    # prefill from scratch
    (4, 300, 4, 4, 256, None),    # several key chunks, largest head_dim
    (6, 200, 6, 3, 64, 50),       # sliding window
    (200, 333, 2, 1, 32, 129),    # long prefill chunk with a window
])
def test_attention(ops, rng, dtype, num_q, seq_len, heads, kv_heads, head_dim, window):
    q, q64 = random_input(ops, rng, (num_q, heads, head_dim), dtype)
    k, k64 = random_input(ops, rng, (seq_len, kv_heads, head_dim), dtype)
    v, v64 = random_input(ops, rng, (seq_len, kv_heads, head_dim), dtype)
    scale = 1 / math.sqrt(head_dim)
    out = ops.attention(q, k, v, scale, sliding_window=window)
    assert_close(ops, out, numpy_ops.attention(q64, k64, v64, scale, window), dtype, "attention")


def random_block_tables(rng, seq_lens, block_size):
    """Block tables over a shuffled pool (with spare blocks), as the BlockManager hands out."""
    blocks_per_seq = -(-seq_lens // block_size)
    num_blocks = int(blocks_per_seq.sum()) + 3
    perm = rng.permutation(num_blocks)
    tables = np.zeros((len(seq_lens), blocks_per_seq.max()), dtype=np.int32)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = perm[used:used + n]
        used += n
    return tables, num_blocks


def random_paged(ops, rng, seq_lens, new_tokens, heads, kv_heads, head_dim, block_size, dtype, padding_rows=0):
    """A paged attention launch's random inputs: block tables, K and V caches and q (on the device
    and in float64), query_start_loc of `new_tokens` a sequence, and `padding_rows` spare q rows."""
    tables, num_blocks = random_block_tables(rng, seq_lens, block_size)
    k_cache, k64 = random_input(ops, rng, (num_blocks, block_size, kv_heads, head_dim), dtype)
    v_cache, v64 = random_input(ops, rng, (num_blocks, block_size, kv_heads, head_dim), dtype)
    qsl = np.concatenate([[0], np.cumsum(new_tokens)]).astype(np.int32)
    q, q64 = random_input(ops, rng, (int(qsl[-1]) + padding_rows, heads, head_dim), dtype)
    return PagedInputs(tables, k_cache, k64, v_cache, v64, qsl, q, q64, int(qsl[-1]))


PagedInputs = collections.namedtuple("PagedInputs", "tables k_cache k64 v_cache v64 qsl q q64 num_tokens")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,window", [(1, None), (16, None), (16, 9), (5, None)])
def test_paged_attention(ops, rng, dtype, block_size, window):
    heads, kv_heads, head_dim = 6, 2, 80
    seq_lens = np.array([1, 37, 5, 200, 20, 9], dtype=np.int32)
    new_tokens = np.array([1, 37, 1, 13, 7, 0], dtype=np.int32)  # decode, prefill, decode, chunks, idle
    tables, k_cache, k64, v_cache, v64, qsl, q, q64, num_tokens = random_paged(
        ops, rng, seq_lens, new_tokens, heads, kv_heads, head_dim, block_size, dtype, padding_rows=1)
    out = ops.paged_attention(q, k_cache, v_cache, cupy.asarray(tables), cupy.asarray(seq_lens),
                              cupy.asarray(qsl), 0.125, window)
    ref = numpy_ops.paged_attention(q64[:num_tokens], k64, v64, tables, seq_lens, qsl, 0.125, window)
    assert_close(ops, out[:num_tokens], ref, dtype, "paged_attention")
    assert not ops.to_host(out[num_tokens]).any(), "the padding row must come back zero"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 40])
def test_kv_cache_writes_and_block_copies(ops, rng, dtype, head_dim, monkeypatch):
    """write_kv, rope_write_kv (eight pairs a thread at 16-bit head size 64; one at head size 40,
    whose halves are not whole vectors) and copy_blocks against the NumPy reference."""
    launched, launch = [], ops._launch
    monkeypatch.setattr(ops, "_launch", lambda name, ctype, *args, **kw: (launched.append((name, ctype)),
                                                                          launch(name, ctype, *args, **kw))[1])
    num_blocks, block_size, kv_heads, heads, tokens = 7, 4, 2, 6, 9
    k_cache, kc64 = random_input(ops, rng, (num_blocks, block_size, kv_heads, head_dim), dtype)
    v_cache, vc64 = random_input(ops, rng, (num_blocks, block_size, kv_heads, head_dim), dtype)
    # q, k, v as the model makes them: views of one QKV projection's columns (tokens strided)
    qkv, qkv64 = random_input(ops, rng, (tokens, (heads + 2 * kv_heads) * head_dim), dtype)
    qs, kvs = heads * head_dim, kv_heads * head_dim
    parts = ((0, qs, heads), (qs, qs + kvs, kv_heads), (qs + kvs, qs + 2 * kvs, kv_heads))
    q, k, v = (qkv[:, a:b].reshape(tokens, n, head_dim) for a, b, n in parts)
    q64, k64, v64 = (qkv64[:, a:b].reshape(tokens, n, head_dim) for a, b, n in parts)
    assert not (q.flags.c_contiguous or k.flags.c_contiguous or v.flags.c_contiguous)
    slots = rng.choice(num_blocks * block_size, size=tokens, replace=False).astype(np.int64)
    ops.write_kv(k, v, k_cache, v_cache, cupy.asarray(slots))
    numpy_ops.write_kv(k64, v64, kc64, vc64, slots)
    np.testing.assert_array_equal(ops.to_host(k_cache), kc64.astype(np.float32))
    np.testing.assert_array_equal(ops.to_host(v_cache), vc64.astype(np.float32))

    table = rope_cos_sin(head_dim, 512, 10000.0).astype(np.float32)
    positions = rng.integers(0, 512, size=tokens).astype(np.int32)
    slots = rng.choice(num_blocks * block_size, size=tokens, replace=False).astype(np.int64)
    q_out = ops.rope_write_kv(q, k, v, cupy.asarray(positions), cupy.asarray(table), k_cache, v_cache,
                              cupy.asarray(slots))
    q_ref = numpy_ops.rope_write_kv(q64, k64, v64, positions, table.astype(np.float64), kc64, vc64, slots)
    assert_close(ops, q_out, q_ref, dtype, "rope_write_kv q")
    vec = head_dim == 64 and dtype != "float32"
    assert launched[-1][0] == "rope_write_kv_kernel" and launched[-1][1].endswith(", 8" if vec else ", 1")
    written = np.zeros(num_blocks * block_size, bool)
    written[slots] = True
    k_rows = ops.to_host(k_cache).reshape(-1, kv_heads, head_dim)
    ref_rows = kc64.reshape(-1, kv_heads, head_dim)
    rel = np.linalg.norm(k_rows[written] - ref_rows[written]) / np.linalg.norm(ref_rows[written])
    assert rel <= TOLERANCE[dtype], f"rotated k in the cache: relative error {rel:.3g}"
    np.testing.assert_array_equal(k_rows[~written], ref_rows[~written].astype(np.float32))
    np.testing.assert_array_equal(ops.to_host(v_cache), vc64.astype(np.float32))

    copies = np.array([[0, 3], [5, 1]], dtype=np.int32)
    ops.copy_blocks(k_cache, v_cache, cupy.asarray(copies))
    numpy_ops.copy_blocks(kc64, vc64, copies)
    np.testing.assert_array_equal(ops.to_host(k_cache)[[1, 3]], ops.to_host(k_cache)[[5, 0]])
    np.testing.assert_array_equal(ops.to_host(v_cache), vc64.astype(np.float32))

    # gather/scatter of cache rows (the KV hand-off): bit-exact moves, any dtype
    slots = np.random.default_rng().permutation(k_cache.shape[0] * k_cache.shape[1])[:9].astype(np.int64)
    rows = ops.gather_cache_rows([k_cache, v_cache], cupy.asarray(slots))
    want = numpy_ops.gather_cache_rows([k_cache.get(), v_cache.get()], slots)
    np.testing.assert_array_equal(rows.get(), want)
    targets = [cupy.zeros_like(k_cache), cupy.zeros_like(v_cache)]
    ops.scatter_cache_rows(targets, cupy.asarray(slots), rows)
    expected = [np.zeros_like(want[0], shape=k_cache.shape), np.zeros_like(want[0], shape=v_cache.shape)]
    numpy_ops.scatter_cache_rows(expected, slots, want)
    for got, ref in zip(targets, expected):
        np.testing.assert_array_equal(got.get(), ref)


def test_shape_errors_are_clear(ops):
    x = cupy.zeros((2, 6, 16), dtype=cupy.float32)
    kv = cupy.zeros((4, 4, 16), dtype=cupy.float32)
    with pytest.raises(ValueError, match="do not divide"):
        ops.attention(x, kv, kv, 0.25)
    with pytest.raises(ValueError, match="does not match weight"):
        ops.linear(cupy.zeros((3, 5), cupy.float32), cupy.zeros((4, 6), cupy.float32))
    with pytest.raises(ValueError, match="approximate"):
        ops.gelu(x, "erf")
    with pytest.raises(ValueError, match="top_k"):
        ops.topk_softmax(cupy.zeros((3, 4), cupy.float32), 5, True)
    with pytest.raises(ValueError, match="bfloat16"):
        ops.rms_norm(cupy.zeros((2, 4), cupy.float64), cupy.ones(4, cupy.float64), 1e-6)


def random_sampling_params(rng, batch):
    return dict(
        temperature=rng.choice([0.0, 0.5, 0.8, 1.0, 1.3], size=batch).astype(np.float32),
        top_k=rng.choice([0, 1, 20, 200, 5000], size=batch).astype(np.int32),
        top_p=rng.choice([1.0, 0.95, 0.8, 0.3, 0.0], size=batch).astype(np.float32),
        seeds=rng.integers(0, 2**64, size=batch, dtype=np.uint64),
        offsets=rng.integers(0, 10_000, size=batch).astype(np.int64),
        min_p=rng.choice([0.0, 0.0, 0.05, 0.3], size=batch).astype(np.float32),
    )


def test_graph_capture_replays_gemm_norm_and_sampling(ops, rng):
    x, _ = random_input(ops, rng, (7, 512), "bfloat16")
    w, w64 = random_input(ops, rng, (1000, 512), "bfloat16", scale=1 / math.sqrt(512))
    bias, bias64 = random_input(ops, rng, (1000,), "bfloat16")
    norm_w, _ = on_device(ops, np.ones(1000), "bfloat16")
    params = {n: cupy.asarray(p) for n, p in random_sampling_params(rng, 7).items()}
    stream = cupy.cuda.Stream(non_blocking=True)

    def step():  # returns every array it makes: the graph keeps writing into them
        y = ops.linear(x, w, bias)
        normed = ops.rms_norm(y, norm_w, 1e-6)
        return y, normed, ops.sample(normed, **params)

    with stream:
        step()  # warm up: compile, size the pools outside the capture
        stream.synchronize()
        stream.begin_capture()
        y, normed, tokens = step()
        graph = stream.end_capture()
        new_x, new_x64 = random_input(ops, rng, (7, 512), "bfloat16")
        x[...] = new_x  # the graph reads x's buffer: change what is in it
        graph.launch(stream)
        stream.synchronize()
    assert_close(ops, y, numpy_ops.linear(new_x64, w64, bias64), "bfloat16", "replayed linear")
    with stream:
        eager_tokens = step()[2]
        stream.synchronize()
    np.testing.assert_array_equal(cupy.asnumpy(tokens), cupy.asnumpy(eager_tokens))


def test_upload_copies_a_steps_arrays_in_one_go(ops, rng):
    """ops.upload (a step's inputs packed into one pinned buffer, one copy): arrays of mixed
    dtypes and shapes, one of them empty, come back on the device equal to the host's, in
    fresh memory of their own. Uploads in turn that outgrow the staging buffers leave the
    earlier ones intact, and host arrays changed after an upload do not reach the device."""
    uploads = []
    for n in (5, 3000, 70000, 7):   # the third outgrows both staging buffers
        arrays = {"token_ids": rng.integers(0, 1 << 30, n).astype(np.int32),
                  "positions": rng.integers(0, 1 << 40, n),
                  "block_tables": rng.integers(0, 100, (n % 13 + 1, 9)).astype(np.int32),
                  "temperature": rng.random(n).astype(np.float32),
                  "seeds": rng.integers(0, 1 << 63, n, dtype=np.uint64),
                  "none": np.zeros(0, np.float32), "flags": rng.random(n) < 0.5}
        kept = {name: array.copy() for name, array in arrays.items()}
        device = ops.upload(arrays)
        for array in arrays.values():
            array[...] = 0   # the caller's arrays are its own again once upload returns
        uploads.append((kept, device))
    for kept, device in uploads:
        assert device.keys() == kept.keys()
        for name, host in kept.items():
            got = cupy.asnumpy(device[name])
            assert got.dtype == host.dtype and got.shape == host.shape, name
            np.testing.assert_array_equal(got, host, err_msg=name)
    empty = ops.upload({"none": np.zeros(0, np.int32), "rows": np.zeros((0, 4), np.int64)})
    assert empty["none"].shape == (0,) and empty["rows"].shape == (0, 4) and empty["rows"].dtype == np.int64
    first, second = uploads[0][1]["token_ids"], uploads[1][1]["token_ids"]
    first[...] = -1
    np.testing.assert_array_equal(cupy.asnumpy(second), uploads[1][0]["token_ids"])
