"""Leader mode's arithmetic: where this process sits in the job (read once
from Slurm's variables or MPI), the check that the MPI world is the whole
job, and the layout of the config's engine groups over the world's ranks.

Groups take consecutive global ranks in config order (group 0 holds global
rank 0, which also runs the coordinator), so a tp=2 group stays on one
node whenever srun places tasks in blocks of whole groups.

Pure functions of their arguments: no MPI calls, no environment reads
beyond the mapping passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from shardline.coordinator.cluster_config import GroupSpec


class LeaderModeError(RuntimeError):
    """Leader mode cannot start as launched; the message says what to change."""


@dataclass(frozen=True)
class RankPlace:
    world_rank: int                 # rank in MPI.COMM_WORLD
    world_size: int
    local_rank: int                 # this process's index on its node
    slurm_ntasks: int | None = None  # tasks srun started for this step; None outside an srun step
    device_id: int = 0              # its GPU: the local rank, or 0 when it sees one GPU only

    @classmethod
    def make(cls, world_rank: int, world_size: int, local_rank: int, environ: Mapping[str, str],
             slurm_ntasks: int | None = None) -> "RankPlace":
        # `srun --gpus-per-task=1` leaves each task one visible GPU: that is device 0, whatever its local id.
        visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        return cls(world_rank, world_size, local_rank, slurm_ntasks, 0 if len(visible) == 1 else local_rank)


@dataclass(frozen=True)
class GroupSlot:
    index: int                      # the group's position in the config (its MPI split colour)
    spec: GroupSpec
    first_rank: int                 # global rank of the group's leader
    num_ranks: int

    @property
    def ranks(self) -> range:
        return range(self.first_rank, self.first_rank + self.num_ranks)


def read_place(environ: Mapping[str, str], world_rank: int, world_size: int,
               mpi_local_rank: Callable[[], int]) -> RankPlace:
    """Inside an srun step (SLURM_STEP_ID is set; a batch script's own shell has none),
    Slurm's task id and local id; elsewhere (mpiexec) the MPI rank and `mpi_local_rank()`."""
    if "SLURM_STEP_ID" not in environ:
        return RankPlace.make(world_rank, world_size, mpi_local_rank(), environ)
    try:
        procid, localid, ntasks = (int(environ[k]) for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"))
    except (KeyError, ValueError) as err:
        raise LeaderModeError(f"srun step without a usable Slurm task variable: {err}") from None
    place = RankPlace.make(world_rank, world_size, localid, environ, ntasks)
    check_world(place)
    if procid != world_rank:
        raise LeaderModeError(f"SLURM_PROCID={procid} but this process is MPI rank {world_rank}: "
                              f"the MPI library numbers ranks differently from srun")
    return place


def check_world(place: RankPlace) -> None:
    """A wrong `srun --mpi=` gives every task a world of its own: fail loudly instead of serving N times."""
    if place.slurm_ntasks is not None and place.slurm_ntasks != place.world_size:
        raise LeaderModeError(
            f"MPI COMM_WORLD has {place.world_size} rank(s) but SLURM_NTASKS={place.slurm_ntasks}: each srun "
            f"task must join one MPI world; start with `srun --mpi=pmi2 shardline leader ...` (the MPI type "
            f"must match your MPI library; see `srun --mpi=list`)")


def lay_out(specs: Sequence[GroupSpec], world_size: int) -> list[GroupSlot]:
    """Consecutive ranks per group; the world must hold exactly the config's tp * pp ranks."""
    slots, first = [], 0
    for index, spec in enumerate(specs):
        slots.append(GroupSlot(index, spec, first, spec.tp * spec.pp))
        first += spec.tp * spec.pp
    if first != world_size:
        layout = ", ".join(f"{s.spec.name}: {s.num_ranks}" for s in slots)
        raise LeaderModeError(f"the config's groups need {first} rank(s) ({layout}) but the job has "
                              f"{world_size}; start as many tasks as that (srun -n {first})")
    return slots


def slot_of(slots: Sequence[GroupSlot], world_rank: int) -> GroupSlot:
    return next(slot for slot in slots if world_rank in slot.ranks)


def describe_ranks(slot: GroupSlot) -> str:
    last = slot.first_rank + slot.num_ranks - 1
    return f"rank {slot.first_rank}" if slot.num_ranks == 1 else f"ranks {slot.first_rank}-{last}"
