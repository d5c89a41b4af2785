"""`EngineConfig`: the settings of one engine (model replica), frozen.

Pure pydantic, no model or kernel imports, so the coordinator's cluster
config can embed it and validate a whole cluster file before any process
starts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EngineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = None                 # None: the embedded default model
    backend: Literal["auto", "numpy", "cuda"] = "auto"
    dtype: str | None = None
    block_size_tokens: int = Field(16, ge=1)
    num_kv_blocks: int | None = Field(None, ge=1)  # None: sized from memory
    gpu_memory_fraction: float = Field(0.85, gt=0, le=1)  # of free GPU memory, for KV
    cpu_kv_cache_bytes: int = Field(1 << 30, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    max_num_seqs: int = Field(128, ge=1)
    max_model_len: int | None = Field(None, ge=1)  # None: the model's context
    enable_prefix_caching: bool = True
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    # Replay decode steps from CUDA graphs (single-rank CUDA engines); False: always eager.
    cuda_graphs: bool = True
    # Graphs in tensor-parallel groups too, every rank capturing the same steps with their
    # NCCL collectives inside (on 2x H100 a Llama-3-8B tp=2 decode step went from 24.6 to
    # 8.7 ms); False: such groups step eagerly.
    tp_cuda_graphs: bool = True
    # Capture every batch-size bucket's graph when the engine starts (as vLLM and TensorRT-LLM
    # do), largest first, so no request waits on a capture or its GEMM tuning; False: a bucket
    # the first time a step needs it. On one H200 (Llama-3-8B, 512 sequences) the ten buckets
    # take 1.3 s at start, and the first 1024-request offline run went from 8.6 to 7.5 s.
    cuda_graphs_at_start: bool = True
    # Decode ahead (single-rank engines): plan and queue step n+1 while the GPU runs step n,
    # requests still decoding taking their next token from step n's output on the device.
    # None: on for single-rank CUDA engines of mixed groups (on one H100 it took Llama-3-8B
    # batch-64 steps from 11.6 to 9.5 ms), off on NumPy and for prefill / decode groups
    # (no KV export with it).
    decode_ahead: bool | None = None
    # A decode group holds blocks reserved for a prefill group's KV this long at most.
    remote_kv_timeout_s: float = Field(30.0, gt=0)
