"""Leader mode on a real local Slurm (scripts/local-slurm up): the repo's
sbatch template runs 4 ranks (two tp=2 groups) in one MPI world through
`srun --mpi=pmi2`; a client streams a completion from rank 0's coordinator
at the address the job wrote; scancel ends every rank. A launch with the
wrong MPI type (`--mpi=none`: one world per task) fails loudly.

Skipped when no Slurm controller answers, unless SHARDLINE_REQUIRE_SLURM=1
(CI), where that is a failure."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from launch_fixtures import SHARDLINE, stream_completion, wait_for_file, write_leader_config
from process_scan import wait_until_gone
from shardline.models.tiny_checkpoint import write_tiny_llama

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "cluster_configs" / "slurm" / "leader.sbatch"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def slurm_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch not installed (scripts/local-slurm up installs and starts a local Slurm)"
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10, env=ENV)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: no Slurm controller answers"
    if result.returncode != 0 or not result.stdout.strip():
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return f"no Slurm controller answers (sinfo: {last_line}); run scripts/local-slurm up"
    return None


PROBLEM = slurm_problem()
if PROBLEM and os.environ.get("SHARDLINE_REQUIRE_SLURM") == "1":
    raise RuntimeError(f"SHARDLINE_REQUIRE_SLURM=1 but {PROBLEM}")
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or "")


def job_state(job_id: str) -> str:
    result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, env=ENV)
    return result.stdout.strip()


def wait_job_gone(job_id: str, timeout_s: float) -> str:
    deadline_s = time.monotonic() + timeout_s
    while (state := job_state(job_id)) and time.monotonic() < deadline_s:
        time.sleep(0.5)
    return state


def test_sbatch_leader_mode_serves_and_scancel_ends_every_rank(tmp_path):
    config = write_leader_config(tmp_path, write_tiny_llama(tmp_path / "tiny"),
                                 [{"name": "a", "tp": 2}, {"name": "b", "tp": 2}])
    address_file, output = tmp_path / "address", tmp_path / "job.out"
    env = {**ENV, "SHARDLINE": SHARDLINE, "SHARDLINE_ADDRESS_FILE": str(address_file)}
    # The template asks for GPUs and 8 tasks per node; this node has 4 CPUs' worth of test and no GPU.
    submit = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=4", "--gpus-per-node=0",
              "--cpus-per-task=1", f"--output={output}", str(TEMPLATE), str(config)]
    job_id = subprocess.run(submit, capture_output=True, text=True, env=env, check=True).stdout.strip().split(";")[0]
    try:
        address = wait_for_file(address_file, 180, still_running=lambda: job_state(job_id) != "")
        assert address, f"job {job_id} wrote no address; its output:\n{output.read_text()[-3000:]}"
        text, healthy = stream_completion(address)
        assert text and healthy == {"a", "b"}
    finally:
        subprocess.run(["scancel", job_id], env=ENV, check=False)
        left = wait_job_gone(job_id, 60)
    assert left == "", f"job {job_id} still {left} after scancel"
    assert wait_until_gone(str(config), timeout_s=30) == []
    log = output.read_text()
    assert "4 tasks" in log and "(2 groups, 4 ranks)" in log
    assert log.count("shardline.worker: stopped") == 2, log[-3000:]   # both group leaders stopped on SIGTERM


def test_wrong_srun_mpi_type_fails_naming_slurm_ntasks(tmp_path):
    config = write_leader_config(tmp_path, write_tiny_llama(tmp_path / "tiny"), [{"name": "a"}, {"name": "b"}])
    command = ["srun", "--mpi=none", "-n", "2", "--cpus-per-task=1", SHARDLINE, "leader", "-c", str(config)]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode != 0
    assert "MPI COMM_WORLD has 1 rank(s) but SLURM_NTASKS=2" in result.stderr, result.stderr[-2000:]
    assert wait_until_gone(str(config)) == []
