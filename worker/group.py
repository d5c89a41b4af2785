"""An engine group of several ranks: one MPI world, run in lockstep.

tp × pp ranks: rank r is pipeline stage r // tp, tensor-parallel rank
r % tp (`ParallelConfig`). The world is split into one tensor-parallel
communicator per stage and one pipeline link per tp rank (parallel/pipeline.py).

The leader (rank 0) owns the scheduler; every step it broadcasts the
`StepPlan` as bytes over MPI (a header: length and kind, then the payload)
and runs its own shard; followers receive the same plan and run theirs, so
the tensor-parallel collectives inside the forward pass line up. Two more
kinds move a disaggregated request's KV (pp = 1 only): READ_KV gathers
every rank's head slice at given cache slots on the leader, WRITE_KV hands
each rank its head slice of the leader's arrays. A zero length ends the
followers' loop. Followers wait for plans with a non-blocking
broadcast and a short sleep, so an idle group does not spin the CPU.

This module moves control messages only; tensors travel through the
group's Communicator (NCCL on GPU, MPI on CPU).
"""

from __future__ import annotations

import dataclasses
import io
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardline.kernels.backend import Backend, create_backend
from shardline.parallel.communicator import MPICommunicator
from shardline.parallel.pipeline import ParallelConfig, StageLinks, StagePlacement
from shardline.parallel.experts import ExpertParallel
from shardline.parallel.sharding import TensorParallel, join_kv_heads, kv_head_range
from shardline.worker.model_runner import StepResult
from shardline.worker.step_plan import StepPlan

IDLE_POLL_S = 0.0005
PLAN, READ_KV, WRITE_KV = 1, 2, 3   # message kinds


@dataclass(frozen=True)
class GroupContext:
    mpi_comm: Any
    backend: Backend
    tp: TensorParallel
    placement: StagePlacement = StagePlacement()  # this rank's pipeline stage and the layout
    links: StageLinks = StageLinks()              # channels to the neighbouring stages
    ep: ExpertParallel = ExpertParallel()          # experts spread over the stage's tp ranks (ep == tp)

    @property
    def rank(self) -> int:
        return self.mpi_comm.Get_rank()

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


def create_group(backend_name: str, dtype: str | None, devices: list[int], mpi_comm: Any = None,
                 parallel: ParallelConfig | None = None, ep: int = 1) -> GroupContext:
    """This rank's backend (GPU chosen from the group's device list by rank),
    its stage's tensor-parallel communicator and its pipeline links.
    `parallel` defaults to tensor parallelism over the whole world. `ep` > 1
    (it must equal tp) spreads the MoE experts over the same ranks."""
    group = _create_group(backend_name, dtype, devices, mpi_comm, parallel)
    if ep == 1:
        return group
    if ep != group.tp.size:
        raise ValueError(f"ep ({ep}) must be 1 or equal tp ({group.tp.size}) in an engine group")
    return dataclasses.replace(group, ep=ExpertParallel(group.tp.comm))


def _create_group(backend_name: str, dtype: str | None, devices: list[int], mpi_comm: Any,
                  parallel: ParallelConfig | None) -> GroupContext:
    if mpi_comm is None:
        from mpi4py import MPI
        mpi_comm = MPI.COMM_WORLD
    rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
    parallel = parallel or ParallelConfig(tp=size)
    if parallel.world_size != size:
        raise ValueError(f"tp * pp = {parallel.world_size} but the MPI world has {size} ranks")
    device_id = devices[rank] if devices else 0
    backend = create_backend(backend_name, dtype, device_id=device_id)
    if size == 1:
        return GroupContext(mpi_comm, backend, TensorParallel())
    stage, tp_rank = parallel.coordinates(rank)
    communicator = _communicator_class(backend)
    tp_comm = mpi_comm if parallel.pp == 1 else mpi_comm.Split(color=stage, key=tp_rank)
    tp = TensorParallel(communicator(tp_comm)) if parallel.tp > 1 else TensorParallel()
    placement = StagePlacement(parallel, stage)
    if parallel.pp == 1:
        return GroupContext(mpi_comm, backend, tp, placement)
    link = communicator(mpi_comm.Split(color=tp_rank, key=stage))
    links = StageLinks(stage, parallel.pp, tp_rank, link, mpi_comm,
                       token_source_rank=parallel.global_rank(parallel.pp - 1, 0))
    return GroupContext(mpi_comm, backend, tp, placement, links)


def _communicator_class(backend: Backend) -> type:
    if backend.name == "cuda":
        from shardline.parallel.nccl_communicator import NCCLCommunicator
        return NCCLCommunicator
    return MPICommunicator


def agree_on_blocks(group: GroupContext, num_blocks: int) -> int:
    """Every rank must allocate the same pool: the smallest any rank can hold."""
    from mpi4py import MPI
    return int(group.mpi_comm.allreduce(num_blocks, op=MPI.MIN))


class BroadcastingRunner:
    """The leader's runner (a ModelRunner, or its PipelineRunner): hands each
    plan to the followers, then runs it."""

    def __init__(self, group: GroupContext, runner: Any):
        self.group, self.runner = group, runner
        self.kv = runner.kv

    def execute(self, plan: StepPlan) -> StepResult:
        self._broadcast(plan)
        return self.runner.execute(plan)

    def submit(self, plan: StepPlan) -> StepResult | None:
        """Pipelines only (the wrapped runner has submit/collect)."""
        self._broadcast(plan)
        return self.runner.submit(plan)

    def collect(self, plan: StepPlan) -> StepResult:
        return self.runner.collect(plan)

    def read_kv(self, slots: np.ndarray, to_host: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Every KV head's K and V at `slots` (the ranks' slices joined over MPI: on the host
        whatever `to_host` says)."""
        self._broadcast_bytes(np.ascontiguousarray(slots, dtype=np.int64).tobytes(), READ_KV)
        k, v = self.runner.read_kv(slots)
        return gather_heads(self.group, self.runner.config, k), gather_heads(self.group, self.runner.config, v)

    def write_kv(self, slots: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """`k`, `v` hold every KV head; each rank writes its own slice."""
        k, v = (x.get() if hasattr(x, "get") else x for x in (k, v))   # raw storage bits from a KV link
        buffer = io.BytesIO()
        np.savez(buffer, slots=np.asarray(slots, dtype=np.int64), k=k, v=v)
        self._broadcast_bytes(buffer.getvalue(), WRITE_KV)
        write_rank_heads(self.group, self.runner, slots, k, v)

    def _broadcast(self, plan: StepPlan) -> None:
        self._broadcast_bytes(plan.to_bytes(), PLAN)

    def _broadcast_bytes(self, data: bytes, kind: int) -> None:
        payload = np.frombuffer(data, dtype=np.uint8)
        _send_header(self.group.mpi_comm, payload.size, kind)
        self.group.mpi_comm.Bcast(payload, root=0)

    def shutdown(self) -> None:
        _send_header(self.group.mpi_comm, 0, PLAN)


def gather_heads(group: GroupContext, config: Any, part: np.ndarray) -> np.ndarray | None:
    """The tp ranks' [..., their heads, head_dim] joined on the leader (None elsewhere)."""
    comm = group.mpi_comm
    sizes = np.zeros(comm.Get_size(), dtype=np.int64) if group.is_leader else None
    comm.Gather(np.asarray([part.size], dtype=np.int64), sizes, root=0)
    flat = np.ascontiguousarray(part).reshape(-1)
    if not group.is_leader:
        comm.Gatherv(flat, None, root=0)
        return None
    sizes = sizes.tolist()
    received = np.empty(sum(sizes), dtype=part.dtype)
    comm.Gatherv(flat, (received, sizes), root=0)
    offsets = np.cumsum([0, *sizes])
    heads = [received[offsets[r]:offsets[r + 1]].reshape(*part.shape[:-2], -1, part.shape[-1])
             for r in range(len(sizes))]
    return join_kv_heads(heads, config)


def write_rank_heads(group: GroupContext, runner: Any, slots: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
    start, stop = kv_head_range(runner.config, group.tp.size, group.tp.rank)
    runner.write_kv(slots, k[..., start:stop, :], v[..., start:stop, :])


def _send_header(comm: Any, num_bytes: int, kind: int) -> None:
    # Non-blocking on both sides: MPI never matches a blocking broadcast
    # with a non-blocking one, and followers must poll (see _wait_bcast).
    comm.Ibcast(np.asarray([num_bytes, kind], dtype=np.int64), root=0).Wait()


def _wait_bcast(comm: Any, buffer: np.ndarray) -> None:
    request = comm.Ibcast(buffer, root=0)
    while not request.Test():
        time.sleep(IDLE_POLL_S)


def follow(group: GroupContext, runner: Any) -> None:
    """A follower's life: run every plan the leader sends until it says stop."""
    header = np.zeros(2, dtype=np.int64)
    while True:
        _wait_bcast(group.mpi_comm, header)
        if header[0] == 0:
            getattr(runner, "close", lambda: None)()   # graphs go before the communicator
            return
        payload = np.empty(int(header[0]), dtype=np.uint8)
        group.mpi_comm.Bcast(payload, root=0)
        if header[1] == PLAN:
            runner.execute(StepPlan.from_bytes(payload.tobytes()), sample=False)
        elif header[1] == READ_KV:
            k, v = runner.read_kv(np.frombuffer(payload.tobytes(), dtype=np.int64))
            gather_heads(group, runner.config, k), gather_heads(group, runner.config, v)
        else:
            arrays = np.load(io.BytesIO(payload.tobytes()))
            write_rank_heads(group, runner, arrays["slots"], arrays["k"], arrays["v"])
