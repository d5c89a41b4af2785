"""Settings of the `ray` and `slurm` launch modes (the `ray:` and `slurm:`
sections of a cluster config), and the one rule both use to advertise an
address other machines can reach.

Pure configuration: nothing here starts a process or imports ray or MPI.
"""

from __future__ import annotations

import socket

from pydantic import BaseModel, ConfigDict, Field

WILDCARD_HOSTS = ("0.0.0.0", "", "::", "[::]")


class RayLaunchConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # "auto": join the running Ray cluster (ray start --head, or the job's under `ray job submit`);
    # "local": start a Ray instance in this process; else a GCS address (host:port) or ray://host:port.
    address: str = "auto"
    namespace: str = "shardline"
    cpus_per_rank: float = Field(1.0, ge=0)
    gpus_per_rank: float = Field(1.0, ge=0)     # 0 on a CPU-only Ray cluster (numpy backend)
    max_restarts: int = Field(3, ge=0)          # times Ray restarts a group's actor after it dies
    worker_host: str = "0.0.0.0"                # the groups' Worker services listen here
    placement_timeout_s: float = Field(60.0, gt=0)  # for the group's GPUs to be reserved


class SlurmLaunchConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    worker_host: str = "0.0.0.0"               # the group leaders' Worker services listen here
    # After SIGTERM, a follower rank waits this long for its leader's stop message, then exits.
    follower_grace_s: float = Field(20.0, gt=0)


def advertised_host(listen_host: str, node_address: str | None = None) -> str:
    """The host others dial for a service listening on `listen_host`: the host itself
    unless it is a wildcard, else `node_address` (e.g. Ray's node IP) or this machine's name."""
    if listen_host not in WILDCARD_HOSTS:
        return listen_host
    return node_address or socket.getfqdn()
