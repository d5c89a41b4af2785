"""Starting test scripts under real MPI: where mpiexec is, a skip marker for
machines without it, and one launcher every multi-rank test uses."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not installed (pip install mpich)")


def mpirun(num_ranks: int, script: str, *args, timeout_s: float = 300) -> None:
    """Runs tests/`script` on `num_ranks` ranks; fails with the stderr tail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NCCL_NVLS_ENABLE": "0",
           "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}  # Open MPI as root; MPICH ignores
    # `-m mpi4py`: an exception on one rank aborts the whole job instead of hanging the others
    cmd = [MPIEXEC, "-n", str(num_ranks), sys.executable, "-m", "mpi4py", str(TESTS / script), *map(str, args)]
    # A session of its own: on a timeout every rank goes, not just mpiexec (a rank left
    # behind would hold its GPU and hang the next test).
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               cwd=TESTS, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"{script} on {num_ranks} ranks ran past {timeout_s} s; its processes were killed. "
                    f"stderr tail:\n{stderr[-3000:]}")
    assert process.returncode == 0, stderr[-3000:]
