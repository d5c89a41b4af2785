"""Leader mode (`shardline leader`) under real MPI (mpiexec, MPICH): four
ranks split into two tp=2 groups serve a streamed completion from rank 0's
coordinator, and SIGTERM to every rank (what scancel does) ends them all
with code 0. A group that does not register in time is named with its
global ranks and the job ends. The layout and world checks are tested as
the pure functions they are."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from launch_fixtures import SHARDLINE, stream_completion, wait_for_file, write_leader_config
from mpi_launch import MPIEXEC, needs_mpi
from process_scan import processes_with, wait_until_gone
from shardline.coordinator.cluster_config import parse_cluster_config
from shardline.models.tiny_checkpoint import write_tiny_llama
from shardline.worker.world_layout import LeaderModeError, describe_ranks, lay_out, read_place, slot_of

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def specs(*tps: int):
    groups = [{"name": f"g{i}", "tp": tp} for i, tp in enumerate(tps)]
    return parse_cluster_config({"groups": groups}).group_specs()


def test_groups_take_consecutive_ranks():
    slots = lay_out(specs(2, 1, 2), world_size=5)
    assert [(s.spec.name, s.first_rank, s.num_ranks) for s in slots] == [("g0", 0, 2), ("g1", 2, 1), ("g2", 3, 2)]
    assert slot_of(slots, 4).spec.name == "g2" and describe_ranks(slots[2]) == "ranks 3-4"
    with pytest.raises(LeaderModeError, match=r"need 5 rank\(s\) \(g0: 2, g1: 1, g2: 2\) but the job has 4"):
        lay_out(specs(2, 1, 2), world_size=4)


def test_place_comes_from_slurm_inside_an_srun_step_else_from_mpi():
    srun = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4"}
    place = read_place(srun, 3, 4, mpi_local_rank=lambda: pytest.fail("srun gives the local id"))
    assert (place.world_rank, place.local_rank, place.device_id, place.slurm_ntasks) == (3, 1, 1, 4)
    one_gpu = read_place({**srun, "CUDA_VISIBLE_DEVICES": "5"}, 3, 4, mpi_local_rank=lambda: 0)
    assert one_gpu.device_id == 0   # srun --gpus-per-task=1: the one GPU it sees
    batch_shell = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4"}  # mpiexec inside sbatch
    assert read_place(batch_shell, 2, 4, mpi_local_rank=lambda: 2).local_rank == 2


def test_a_world_smaller_than_the_srun_step_fails_loudly():
    srun = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4"}
    with pytest.raises(LeaderModeError, match=r"COMM_WORLD has 1 rank\(s\) but SLURM_NTASKS=4.*--mpi=pmi2"):
        read_place(srun, 0, 1, mpi_local_rank=lambda: 0)


ABORTING_CHILD = """
import logging, os, sys
from shardline.worker import leader_mode
logging.basicConfig(level=logging.INFO)
class World:
    def Abort(self, code):
        os._exit(code)
leader_mode._abort(World(), "the reason " + "x" * 100)
"""


def test_abort_waits_until_the_launcher_has_read_the_reason():
    # mpiexec dropped a rank's last lines when the abort came first (CI, 2026-11-28).
    child = subprocess.Popen([sys.executable, "-c", ABORTING_CHILD], stderr=subprocess.PIPE, env=ENV)
    try:
        time.sleep(1.0)   # stderr unread: the child must still be waiting to abort
        assert child.poll() is None
        assert b"the reason xxx" in child.stderr.read()
        assert child.wait(timeout=10) == 1
    finally:
        child.kill()
        child.wait()


@needs_mpi
def test_four_ranks_two_tp2_groups_serve_and_stop_on_sigterm(tmp_path):
    config = write_leader_config(tmp_path, write_tiny_llama(tmp_path / "tiny"),
                                 [{"name": "a", "tp": 2}, {"name": "b", "tp": 2}])
    address_file = tmp_path / "address"
    command = [MPIEXEC, "-n", "4", SHARDLINE, "leader", "-c", str(config), "--address-file", str(address_file)]
    with open(tmp_path / "job.log", "wb") as log:
        job = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    try:
        address = wait_for_file(address_file, 120, still_running=lambda: job.poll() is None)
        assert address, (tmp_path / "job.log").read_text()[-3000:]
        text, healthy = stream_completion(address)
        assert text and healthy == {"a", "b"}
        ranks = processes_with(SHARDLINE, "leader", str(config))
        ranks = [pid for pid in ranks if pid != job.pid]
        assert len(ranks) == 4
        for pid in ranks:   # as scancel does: every task gets SIGTERM
            os.kill(pid, signal.SIGTERM)
        assert job.wait(timeout=60) == 0, (tmp_path / "job.log").read_text()[-3000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert wait_until_gone(str(config)) == []
    log = (tmp_path / "job.log").read_text()
    assert log.count("shardline.worker: stopped") == 2   # both leaders stopped cleanly


@needs_mpi
def test_group_not_registering_in_time_is_named_and_the_job_ends(tmp_path):
    # The embedded model takes seconds to load: longer than this startup timeout.
    config = write_leader_config(tmp_path, "default", [{"name": "a"}, {"name": "b"}], startup_timeout_s=0.5)
    command = [MPIEXEC, "-n", "2", SHARDLINE, "leader", "-c", str(config)]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode != 0
    assert "group(s) a (rank 0), b (rank 1) did not register within 0.5 s" in result.stderr, result.stderr[-4000:]
    assert wait_until_gone(str(config)) == []
