"""Run under mpiexec: load a checkpoint tensor-parallel over COMM_WORLD on
the NumPy backend, compute teacher-forced logits and a greedy continuation,
and (rank 0) save them with each rank's resident weight bytes to an .npz.

usage: mpiexec -n N python mpi_tp_run.py CHECKPOINT PROMPT_IDS_CSV NUM_TOKENS OUT.npz [BACKEND DTYPE]
(default numpy float32; on GPUs rank r uses device r and the group talks NCCL)
"""

from __future__ import annotations

import sys

import numpy as np
from mpi4py import MPI

from shardline.models.loader import load_model
from shardline.worker.group import create_group
from shardline.worker.generate import generate, prompt_logits
from shardline.worker.sampling_params import SamplingParams


def resident_bytes(root) -> int:
    """Bytes of every distinct NumPy array reachable from the model object."""
    seen, total, stack = set(), 0, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if hasattr(obj, "nbytes") and hasattr(obj, "dtype") and hasattr(obj, "shape"):  # numpy or cupy
            total += obj.nbytes
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            stack.extend(v for k, v in vars(obj).items() if k not in ("backend", "ops", "xp", "tp", "comm"))
    return total


def main() -> None:
    path, prompt_csv, num_tokens, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    backend, dtype = (sys.argv[5], sys.argv[6]) if len(sys.argv) > 6 else ("numpy", "float32")
    comm = MPI.COMM_WORLD
    group = create_group(backend, dtype, list(range(comm.Get_size())) if backend == "cuda" else [], comm)
    model = load_model(path, group.backend, show_progress=False, tp=group.tp).model
    prompt = [int(t) for t in prompt_csv.split(",")]
    logits = prompt_logits(model, prompt)
    tokens = list(generate(model, prompt, SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True)))
    weight_bytes = comm.gather(resident_bytes(model), root=0)
    if comm.rank == 0:
        np.savez(out, logits=logits, tokens=np.asarray(tokens), weight_bytes=np.asarray(weight_bytes))


if __name__ == "__main__":
    main()
