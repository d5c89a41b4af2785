"""`shardline leader -c FILE`: Slurm leader mode. `srun` (or `mpiexec`)
starts every rank of the job in one MPI world; each rank finds its place
once (worker/world_layout.py), the world is split into the config's
engine groups, and each group runs as under the local launcher: its rank 0
serves the Worker service and registers, the others follow its steps.
Global rank 0 also runs the coordinator, broadcasts its address to all
ranks, waits for every group to register and writes the client address
to `--address-file` for clients to find.

Failure ends the whole job instead of hanging it: a rank that raises
calls MPI Abort; a group that does not register within
`coordinator.startup_timeout_s` is named (with its global ranks) and the
job aborted. On SIGTERM (scancel) each group leader stops and releases its
followers (who wait `slurm.follower_grace_s` for that), and rank 0 then
stops the coordinator.

It must not hold serving or routing logic: it wires rank_main's pieces and
the coordinator's start_cluster together.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import signal
import stat
import struct
import sys
import termios
import threading
import time
from pathlib import Path
from typing import Any

from shardline.coordinator.cluster_config import ClusterConfig, ClusterConfigError, GroupSpec, load_cluster_config
from shardline.coordinator.launch_config import advertised_host
from shardline.parallel.pipeline import ParallelConfig
from shardline.worker import rank_main
from shardline.worker.group import GroupContext, create_group
from shardline.worker.world_layout import (GroupSlot, LeaderModeError, RankPlace, describe_ranks, lay_out,
                                           read_place, slot_of)

log = logging.getLogger("shardline.leader")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def main(config_path: str, address_file: str | None = None) -> int:
    try:
        config = load_cluster_config(config_path)
    except ClusterConfigError as err:
        print(f"shardline leader: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    rank_main.configure_logging(f"rank {world.Get_rank()}")
    try:
        place = read_place(os.environ, world.Get_rank(), world.Get_size(),
                           lambda: world.Split_type(MPI.COMM_TYPE_SHARED).Get_rank())
        slots = lay_out(config.group_specs(), place.world_size)
    except LeaderModeError as err:   # every rank finds the same: each exits, none waits on another
        log.error("%s", err)
        return EXIT_USAGE
    try:
        code = _run_rank(config, config_path, place, slots, world, address_file)
        # Done: a SIGTERM still on its way (scancel signals every task at about the same
        # time) must not kill this rank inside MPI_Finalize, after Python has put the default
        # handlers back, and turn a clean stop into a failed job. SIG_IGN outlives that reset.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return code
    except Exception:
        log.exception("rank %d failed; aborting the job", place.world_rank)
        _abort_after_logging(world)   # the other ranks may wait in a collective for this one
        return EXIT_FAILED


def _run_rank(config: ClusterConfig, config_path: str, place: RankPlace, slots: list[GroupSlot], world: Any,
              address_file: str | None) -> int:
    slot = slot_of(slots, place.world_rank)
    group_comm = world.Split(color=slot.index, key=place.world_rank)
    devices = group_comm.allgather(place.device_id)   # devices[rank in group]: that rank's GPU
    spec = slot.spec.model_copy(update={"devices": devices})
    log.info("group %s (%s of %d), GPU %d", spec.name, describe_ranks(slot), place.world_size, place.device_id)
    if place.world_rank == 0:
        return asyncio.run(_run_rank0(config, config_path, spec, group_comm, world, slots, address_file))
    coordinator = world.bcast(None, root=0)
    group = _join(spec, group_comm)
    if not group.is_leader:
        return _follow(spec, group, config.slurm.follower_grace_s)
    return asyncio.run(rank_main.serve(config, spec, _worker_args(config, config_path, spec, coordinator), group))


def _join(spec: GroupSpec, group_comm: Any) -> GroupContext:
    parallel = ParallelConfig(spec.tp, spec.pp, spec.pp_layers)
    return create_group(spec.engine.backend, spec.engine.dtype, spec.devices, mpi_comm=group_comm,
                        parallel=parallel, ep=spec.ep)


def _worker_args(config: ClusterConfig, config_path: str, spec: GroupSpec, coordinator: str) -> argparse.Namespace:
    host = config.slurm.worker_host
    return argparse.Namespace(config=config_path, group=spec.name, coordinator=coordinator, host=host, port=0,
                              advertise_host=advertised_host(host), parent_poll_s=0.5)


def _follow(spec: GroupSpec, group: GroupContext, grace_s: float) -> int:
    """A follower leaves when its leader says so; SIGTERM only starts a deadline for that."""
    def on_term(signum, frame) -> None:
        log.info("SIGTERM: waiting up to %g s for the group leader's stop", grace_s)
        timer = threading.Timer(grace_s, os._exit, (EXIT_FAILED,))
        timer.daemon = True
        timer.start()
    signal.signal(signal.SIGTERM, on_term)
    return rank_main.run_follower(spec, group)


async def _run_rank0(config: ClusterConfig, config_path: str, spec: GroupSpec, group_comm: Any, world: Any,
                     slots: list[GroupSlot], address_file: str | None) -> int:
    from shardline.coordinator.server import start_cluster  # coordinator code: rank 0 only
    cluster = await start_cluster(config, config_path, launch=False)
    try:
        coordinator_host = advertised_host(config.coordinator.host)
        control = f"{coordinator_host}:{cluster.control_address.rsplit(':', 1)[1]}"
        world.bcast(control, root=0)
        group = _join(spec, group_comm)
        worker = asyncio.ensure_future(rank_main.serve(config, spec, _worker_args(config, config_path, spec,
                                                                                   cluster.control_address), group))
        await _wait_ready(cluster, slots, worker, config.coordinator.startup_timeout_s, world)
        client_address = f"{coordinator_host}:{cluster.address.rsplit(':', 1)[1]}"
        print(f"shardline leader: serving {config.served_model_name} on {client_address} "
              f"({len(slots)} groups, {world.Get_size()} ranks)", file=sys.stderr, flush=True)
        if address_file:
            _write_atomically(Path(address_file), client_address + "\n")
        code = await worker   # until SIGTERM (rank_main.serve handles it)
    finally:
        await cluster.stop()
    if code != EXIT_OK:   # the other groups would serve on without a coordinator
        _abort(world, f"group {spec.name} on rank 0 failed (exit code {code})")
    return code


async def _wait_ready(cluster, slots: list[GroupSlot], worker: asyncio.Future, timeout_s: float, world: Any) -> None:
    """Every group registered; otherwise name the groups (and ranks) missing and abort the job."""
    names = [slot.spec.name for slot in slots]
    deadline_s = time.monotonic() + timeout_s
    while not cluster.registry.is_ready(names):
        if worker.done():
            _abort(world, f"group {slots[0].spec.name} ({describe_ranks(slots[0])}) stopped before the cluster "
                          f"was ready (exit code {worker.result()})")
        if time.monotonic() > deadline_s:
            missing = [f"{s.spec.name} ({describe_ranks(s)})" for s in slots
                       if not cluster.registry.is_ready([s.spec.name])]
            _abort(world, f"group(s) {', '.join(missing)} did not register within {timeout_s:g} s "
                          f"(coordinator.startup_timeout_s); see those ranks' log lines above")
        await cluster.registry.wait_changed(0.1)


def _abort(world: Any, message: str) -> None:
    log.error("%s; aborting the job", message)
    _abort_after_logging(world)


def _abort_after_logging(world: Any, drain_timeout_s: float = 2.0) -> None:
    """MPI Abort once the launcher has read what this rank logged. mpiexec (hydra) kills the
    job on the abort and may drop the rank's last stderr lines still in the pipe: the reason
    the job ended. So wait, briefly, for the pipe to empty."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    deadline_s = time.monotonic() + drain_timeout_s
    while _unread_stderr_bytes() and time.monotonic() < deadline_s:
        time.sleep(0.01)
    world.Abort(EXIT_FAILED)


def _unread_stderr_bytes() -> int:
    """Bytes written to stderr that its reader has not yet taken: Linux answers FIONREAD on
    either end of a pipe. 0 for a terminal or file (nothing to wait for) or where unanswered."""
    try:
        if not stat.S_ISFIFO(os.fstat(2).st_mode):
            return 0
        return struct.unpack("i", fcntl.ioctl(2, termios.FIONREAD, b"\0" * 4))[0]
    except OSError:
        return 0


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)
