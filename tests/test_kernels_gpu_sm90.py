"""flash_prefill_sm90.cu (sm_90 only) against the float64 reference: its shared-memory
descriptors (built as shipped it matches, built with either descriptor's byte offsets swapped,
F9_SWAP_K or F9_SWAP_V, it does not, so the test sees the layouts it rests on), and rows the
prefill test in test_kernels_gpu_fast_paths.py leaves out. Same fixtures as test_kernels_gpu.py;
skipped without CuPy, a GPU or an sm_90 device.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest

from gpu_guard import cupy  # noqa: F401, E402  (skips the module without a GPU)

from shardline.kernels import cuda_common, numpy_ops  # noqa: E402
from test_kernels_gpu import (  # noqa: E402, F401  (fixtures: ops, rng, poisoned_allocations)
    assert_close,
    ops,
    poisoned_allocations,
    random_paged,
    rng,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(str(cupy.cuda.Device().compute_capability) != "90",
                                                  reason="flash_prefill_sm90.cu is built for sm_90a alone")]


def build(defines: tuple[str, ...]) -> dict:
    """flash_prefill_sm90.cu's kernels built with extra -D options."""
    module = "flash_prefill_sm90"
    options = ("-std=c++17",) + defines + cuda_common._include_options()
    return cuda_common._compile_for_arch(cuda_common._module_source(module), cuda_common._kernel_names(module),
                                         options, cuda_common._ARCH_MODULES[module][0])


@pytest.mark.parametrize("head_dim", [64, 128])
def test_flash_prefill_sm90_descriptors(ops, rng, head_dim, monkeypatch):
    monkeypatch.setattr(ops, "use_flash", True)
    monkeypatch.setattr(ops, "prefill_sm90", True)
    heads, kv_heads, block_size = 8, 2, 16
    seq_lens = np.array([200, 70], dtype=np.int32)
    new_tokens = np.array([150, 70], dtype=np.int32)
    tables, k_cache, k64, v_cache, v64, qsl, q, q64, _ = random_paged(
        ops, rng, seq_lens, new_tokens, heads, kv_heads, head_dim, block_size, "bfloat16")
    scale = 1 / math.sqrt(head_dim)
    ref = numpy_ops.paged_attention(q64, k64, v64, tables, seq_lens, qsl, scale)
    key = ("flash_prefill_sm90_kernel", f"__nv_bfloat16, {head_dim}")
    errors = {}
    for defines in ((), ("-DF9_SWAP_K",), ("-DF9_SWAP_V",)):
        function = build(defines)[key]
        function.max_dynamic_shared_size_bytes = cuda_common.flash_prefill_sm90_smem_bytes(head_dim)
        monkeypatch.setitem(ops._functions, key, function)
        out = ops.paged_attention(q, k_cache, v_cache, cupy.asarray(tables), cupy.asarray(seq_lens),
                                  cupy.asarray(qsl), scale)
        got = ops.to_host(out).astype(np.float64)
        errors[" ".join(defines) or "shipped"] = float(np.abs(got - ref).max()) if np.isfinite(got).all() else math.inf
    # bf16 output of softmax-weighted unit normals: about 2^-8 relative; 0.05 is far from a wrong layout's error
    assert errors["shipped"] < 0.05, errors
    assert errors["-DF9_SWAP_K"] > 0.2 and errors["-DF9_SWAP_V"] > 0.2, errors


@pytest.mark.parametrize("head_dim,window", [(128, None), (64, None), (128, 33)])
@pytest.mark.parametrize("dependent", [False, True])
def test_flash_prefill_sm90_uneven_rows(ops, rng, head_dim, window, dependent, monkeypatch):
    """Rows the prefill test leaves out (a review's list): 3 heads a KV head, so a query's heads
    straddle warps and warpgroups; tiles whose second warpgroup is partly busy (120 and 75 rows
    of 128) or idle (21); cache blocks of 5 tokens; one key split and several; dependent
    launches as captured graphs make them."""
    monkeypatch.setattr(ops, "use_flash", True)
    monkeypatch.setattr(ops, "prefill_sm90", True)
    monkeypatch.setattr(ops, "use_dependent_launch", True)
    heads, kv_heads, block_size = 6, 2, 5
    seq_lens = np.array([100, 25, 300], dtype=np.int32)
    new_tokens = np.array([40, 25, 7], dtype=np.int32)
    tables, k_cache, k64, v_cache, v64, qsl, q, q64, _ = random_paged(
        ops, rng, seq_lens, new_tokens, heads, kv_heads, head_dim, block_size, "bfloat16")
    scale = 1 / math.sqrt(head_dim)
    ref = numpy_ops.paged_attention(q64, k64, v64, tables, seq_lens, qsl, scale, window)
    launched, launch = [], ops._launch
    monkeypatch.setattr(ops, "_launch", lambda name, *args, **kw: (launched.append(name), launch(name, *args, **kw))[1])
    for sms in (ops._multiprocessors, 1):   # keys split over blocks, then one split
        monkeypatch.setattr(ops, "_multiprocessors", sms)
        with ops.dependent_launches() if dependent else contextlib.nullcontext():
            out = ops.paged_attention(q, k_cache, v_cache, cupy.asarray(tables), cupy.asarray(seq_lens),
                                      cupy.asarray(qsl), scale, window)
        assert_close(ops, out, ref, "bfloat16", f"sm90 prefill, group 3, {sms} SMs' splits, dependent {dependent}")
    assert launched == ["flash_prefill_sm90_kernel"] * 2
