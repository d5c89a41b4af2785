"""Run under mpiexec: expert parallelism on the NumPy backend over COMM_WORLD.

usage:
  mpiexec -n N python mpi_ep_run.py model CHECKPOINT PROMPT_IDS_CSV NUM_TOKENS OUT.npz TP
      load the MoE checkpoint with experts spread over all N ranks (ep = N)
      and attention split over TP ranks (1: replicated; else TP must be N),
      optionally BACKEND (numpy, cuda: rank r on GPU r) and DTYPE after TP;
      compute teacher-forced logits and a greedy continuation; rank 0 saves
      them, each rank's resident expert bytes and the prompt's expert loads.
  mpiexec -n N python mpi_ep_run.py all_to_all
      checks MPICommunicator.all_to_all_v with uneven (and zero) counts.
"""

from __future__ import annotations

import sys

import numpy as np
from mpi4py import MPI

from mpi_tp_run import resident_bytes
from shardline.kernels.backend import create_backend
from shardline.models.loader import load_model
from shardline.models.moe import SparseMoE
from shardline.parallel.communicator import MPICommunicator
from shardline.parallel.experts import ExpertParallel
from shardline.worker.group import create_group
from shardline.worker.generate import generate, prompt_logits
from shardline.worker.sampling_params import SamplingParams


def load_ep_model(path: str, tp_size: int, backend: str = "numpy", dtype: str = "float32"):
    """Experts over every rank; attention split over them too (tp = N) or
    replicated (tp = 1). With tp = N this is the engine group's own path
    (create_group(..., ep=N)); tp = 1 builds the communicators by hand."""
    if tp_size > 1:
        devices = list(range(MPI.COMM_WORLD.Get_size())) if backend == "cuda" else []
        group = create_group(backend, dtype, devices, MPI.COMM_WORLD, ep=MPI.COMM_WORLD.Get_size())
        return load_model(path, group.backend, show_progress=False, tp=group.tp, ep=group.ep).model
    world = MPI.COMM_WORLD
    rank_backend = create_backend(backend, dtype, device_id=world.Get_rank() if backend == "cuda" else 0)
    if rank_backend.name == "cuda":
        from shardline.parallel.nccl_communicator import NCCLCommunicator
        ep = ExpertParallel(NCCLCommunicator(world))
    else:
        ep = ExpertParallel(MPICommunicator(world))
    return load_model(path, rank_backend, show_progress=False, ep=ep).model


def run_model(path: str, prompt_csv: str, num_tokens: int, out: str, tp_size: int,
              backend: str = "numpy", dtype: str = "float32") -> None:
    model = load_ep_model(path, tp_size, backend, dtype)
    prompt = [int(t) for t in prompt_csv.split(",")]
    logits = prompt_logits(model, prompt)
    loads = np.stack([load.tokens_per_expert for load in model.expert_loads()])  # [moe layers, experts]
    tokens = list(generate(model, prompt, SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True)))
    experts = [layer.mlp.experts for layer in model.layers if isinstance(layer.mlp, SparseMoE)]
    expert_bytes = MPI.COMM_WORLD.gather(resident_bytes(experts), root=0)
    if MPI.COMM_WORLD.rank == 0:
        np.savez(out, logits=logits, tokens=np.asarray(tokens), expert_bytes=np.asarray(expert_bytes),
                 loads=loads)


def check_all_to_all() -> None:
    comm = MPICommunicator(MPI.COMM_WORLD)
    rank, size = comm.rank, comm.size

    def count(src: int, dst: int) -> int:  # rows src sends dst; some pairs send none
        return (src * 3 + dst * 5) % 4

    for dtype in (np.float32, np.int32):
        send_counts = [count(rank, dst) for dst in range(size)]
        # row value = 100 * src + 10 * dst + index within the message, repeated over a [2, 3] row shape
        rows = [np.full((2, 3), 100 * rank + 10 * dst + i, dtype=dtype)
                for dst in range(size) for i in range(count(rank, dst))]
        send = np.stack(rows) if rows else np.zeros((0, 2, 3), dtype=dtype)
        got, recv_counts = comm.all_to_all_v(send, send_counts)
        assert recv_counts == [count(src, rank) for src in range(size)], recv_counts
        want = [100 * src + 10 * rank + i for src in range(size) for i in range(count(src, rank))]
        assert got.dtype == dtype and got.shape == (len(want), 2, 3), (got.dtype, got.shape)
        assert (got[:, 0, 0] == want).all() and (got == got[:, :1, :1]).all(), got[:, 0, 0]
        again, _ = comm.all_to_all_v(send, send_counts, recv_counts)  # counts known: no exchange
        assert np.array_equal(again, got)


def main() -> None:
    if sys.argv[1] == "all_to_all":
        check_all_to_all()
    else:
        run_model(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6]), *sys.argv[7:9])


if __name__ == "__main__":
    main()
