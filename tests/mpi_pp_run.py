"""Run under mpiexec: a pipeline (× tensor) parallel group on the NumPy backend.

  model  CHECKPOINT TP PP SPLIT PROMPT_IDS_CSV NUM_TOKENS OUT.npz [BACKEND DTYPE]
      Each rank loads its stage; teacher-forced logits and a greedy
      continuation go stage to stage over the pipeline links; rank 0 saves
      them with each rank's resident weight bytes and layer range.
  engine CHECKPOINT TP PP SPLIT JOBS.json OUT.json
      Rank 0 runs an LLMEngine over the group (the others follow its
      steps, as `python -m shardline.worker` does) for each job in turn and
      saves each job's tokens, the engine stats and integrity checks.

SPLIT is "cost" (split by parameter cost) or layers per stage, "2,1".
"""

from __future__ import annotations

import json
import sys

import numpy as np
from mpi4py import MPI

from mpi_tp_run import resident_bytes
from shardline.models.loader import load_model
from shardline.parallel.pipeline import ParallelConfig
from shardline.worker.engine import EngineConfig, LLMEngine, follower_runner
from shardline.worker.group import create_group, follow
from shardline.worker.offline import LocalModel
from shardline.worker.sampling_params import SamplingParams
from shardline.worker.sequence_cache import SequenceKVCache


def join(tp: str, pp: str, split: str, dtype: str, backend: str = "numpy"):
    layers = None if split == "cost" else tuple(int(n) for n in split.split(","))
    devices = list(range(MPI.COMM_WORLD.Get_size())) if backend == "cuda" else []  # rank r on GPU r
    return create_group(backend, dtype, devices, MPI.COMM_WORLD, ParallelConfig(int(tp), int(pp), layers))


def stage_forward(model, links, cache: SequenceKVCache, token_ids: list[int]):
    """Hidden states of the new tokens on the last stage; None elsewhere."""
    xp, n = model.backend.xp, len(token_ids)
    positions = xp.arange(cache.num_tokens, cache.num_tokens + n, dtype=np.int32)
    ctx = cache.begin_step(n)
    if links.is_first:
        x, residual = model.embed_tokens(xp.asarray(np.asarray(token_ids, dtype=np.int32)), positions), None
    else:
        like = model.backend.zeros((n, model.config.hidden_size))
        x, residual = links.recv_prev(like), links.recv_prev(like)
    x, residual = model.run_layers(x, residual, positions, ctx)
    cache.end_step()
    if not links.is_last:
        links.send_stream(x, residual)
        return None
    return model.final_norm(x, residual)


def to_leader(links, array: np.ndarray, like: np.ndarray) -> np.ndarray:
    """The last stage's tp rank 0 hands `array` to global rank 0."""
    comm = links.control
    if links.returns_tokens and comm.rank != 0:
        comm.Send(np.ascontiguousarray(array), dest=0)
    if comm.rank == 0 and not links.returns_tokens:
        comm.Recv(like, source=links.token_source_rank)
        return like
    return array


def run_model(path, tp, pp, split, prompt_csv, num_tokens, out, backend="numpy", dtype="float32") -> None:
    group = join(tp, pp, split, dtype, backend)
    model, links, comm = load_model(path, group.backend, False, group.tp, group.placement).model, group.links, \
        MPI.COMM_WORLD
    prompt = [int(t) for t in prompt_csv.split(",")]
    cache = SequenceKVCache(model.backend, model.config, len(prompt) + int(num_tokens), model.num_kv_heads_per_rank)
    hidden = stage_forward(model, links, cache, prompt)
    vocab = model.config.vocab_size
    to_numpy = model.backend.to_numpy
    logits = to_numpy(model.compute_logits(hidden)) if links.is_last else np.zeros((len(prompt), vocab), np.float32)
    logits = to_leader(links, logits, np.zeros((len(prompt), vocab), np.float32))
    tokens, step_input = [], prompt
    for _ in range(int(num_tokens)):
        token = np.zeros(1, dtype=np.int32)
        if links.is_last:
            token[0] = int(np.argmax(to_numpy(model.compute_logits(hidden[-1:]))[0]))
        comm.Bcast(token, root=links.token_source_rank)
        tokens.append(int(token[0]))
        step_input = [int(token[0])]
        hidden = stage_forward(model, links, cache, step_input)
    weight_bytes = comm.gather(resident_bytes(model), root=0)
    layers = comm.gather([model.stage.first_layer, model.stage.first_layer + len(model.layers)], root=0)
    if comm.rank == 0:
        np.savez(out, logits=logits, tokens=np.asarray(tokens), weight_bytes=np.asarray(weight_bytes),
                 layers=np.asarray(layers))


def run_job(engine: LLMEngine, job: dict) -> dict:
    """Tokens (and log-probabilities, keyed by token id as text) per prompt."""
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, logprobs=job.get("logprobs", 0))
              for m in job["max_tokens"]]
    if job["mode"] == "sequential":
        return {"tokens": [engine.generate([prompt], [p])[0].token_ids for prompt, p in zip(job["prompts"], params)]}
    rids = [f"{job['name']}-{i}" for i in range(len(job["prompts"]))]
    tokens, logprobs = {rid: [] for rid in rids}, {rid: [] for rid in rids}
    for rid, prompt, p in zip(rids, job["prompts"], params):
        engine.add_request(rid, prompt, p)
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            logprobs[out.request_id] += out.logprobs
        engine.block_manager.check_integrity()
    return {"tokens": [tokens[r] for r in rids], "logprobs": [logprobs[r] for r in rids]}


def run_engine(path, tp, pp, split, jobs_path, out) -> None:
    spec = json.loads(open(jobs_path).read())
    backend = spec.get("backend", "numpy")
    group = join(tp, pp, split, spec.get("dtype", "float64"), backend)
    model = load_model(path, group.backend, False, group.tp, group.placement).model
    config = EngineConfig(backend=backend, dtype=spec.get("dtype"), **spec["engine"])
    if not group.is_leader:
        follow(group, follower_runner(config, LocalModel(model, None), group))
        return
    engine = LLMEngine(config, LocalModel(model, None), group)
    results = {"jobs": {job["name"]: run_job(engine, job) for job in spec["jobs"]}}
    engine.block_manager.check_integrity()
    graphs = getattr(getattr(engine.runner, "runner", engine.runner), "graphs", None)
    results.update(stats=engine.stats(), num_free_blocks=engine.block_manager.num_free_blocks,
                   graph_replays=graphs.num_replays if graphs is not None else 0)
    engine.shutdown()
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    {"model": run_model, "engine": run_engine}[sys.argv[1]](*sys.argv[2:])
