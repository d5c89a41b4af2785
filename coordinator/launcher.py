"""`LocalLauncher`: starts each engine group's worker process on this
machine and stops them all again.

Each group runs `python -m shardline.worker --config FILE --group NAME
--coordinator HOST:PORT` (a group of several ranks under `mpiexec -n N
python -m mpi4py -m shardline.worker ...`, so one failing rank aborts the
whole world) in a process group (session) of its own, so
stopping it reaches every rank it spawned: SIGTERM to the process group,
SIGKILL after a grace period. Each process's stdout and stderr go to files
in a log folder; a group that exits early or does not register in time is
reported with the last lines of its stderr. A temporary log folder is
removed after a clean stop and kept after any failure. An atexit hook
kills what is left if the coordinator exits without stopping (the workers
also exit when their parent dies).

Must not route or judge health beyond "the process exited"; readiness is
read from the Registry.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from shardline.coordinator.registry import Registry

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0
POLL_INTERVAL_S = 0.1
STDERR_TAIL_LINES = 20


class LaunchError(RuntimeError):
    """A group could not be started or did not become ready; the message names it."""


@dataclass
class WorkerProcess:
    group: str
    process: subprocess.Popen
    stdout_path: Path
    stderr_path: Path

    def stderr_tail(self, num_lines: int = STDERR_TAIL_LINES) -> str:
        try:
            lines = self.stderr_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no stderr)"
        return "\n".join(lines[-num_lines:]) or "(stderr is empty)"

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)  # the process leads its own session and group
        except ProcessLookupError:
            pass


class LocalLauncher:
    def __init__(self, config_path: str | Path, group_names: Sequence[str], coordinator_address: str,
                 log_dir: str | Path | None = None, extra_env: dict[str, str] | None = None,
                 ranks_by_group: dict[str, int] | None = None, worker_args: Sequence[str] = (),
                 die_with_parent: bool = False):
        self.worker_args = list(worker_args)  # appended to each worker's command line (e.g. --host)
        # SIGTERM each group when this process dies, however it dies (a Ray actor is SIGKILLed).
        self._preexec = _term_on_parent_death if die_with_parent else None
        self.config_path = Path(config_path).resolve()
        self.group_names = list(group_names)
        self.ranks_by_group = dict(ranks_by_group or {})  # groups not named have one rank
        self.coordinator_address = coordinator_address
        self._owns_log_dir = log_dir is None
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="shardline-workers-"))
        self._extra_env = dict(extra_env or {})
        self.processes: dict[str, WorkerProcess] = {}
        self._atexit_registered = False

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Open MPI refuses to run as root unless told; MPICH ignores these.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1",
               "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "NCCL_NVLS_ENABLE": "0",
               **self._blas_threads(), **self._extra_env}
        for name in self.group_names:
            command = self._rank_launcher(name) + [
                "-m", "shardline.worker", "--config", str(self.config_path), "--group", name,
                "--coordinator", self.coordinator_address, *self.worker_args]
            stdout_path, stderr_path = self.log_dir / f"{name}.out", self.log_dir / f"{name}.err"
            with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                           env=env, start_new_session=True, preexec_fn=self._preexec)
            self.processes[name] = WorkerProcess(name, process, stdout_path, stderr_path)
            log.info("started group %s (pid %d), logs in %s", name, process.pid, self.log_dir)
        if not self._atexit_registered:
            atexit.register(self.kill_all)
            self._atexit_registered = True

    def _blas_threads(self) -> dict[str, str]:
        """Ranks on one machine share its cores: give each rank's BLAS its share
        (a NumPy engine with every core per rank thrashes), unless the user set it."""
        total_ranks = sum(self.ranks_by_group.get(name, 1) for name in self.group_names)
        threads = str(max(1, (os.cpu_count() or 1) // max(1, total_ranks)))
        names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
        return {} if any(n in os.environ for n in names) else {n: threads for n in names}

    def _rank_launcher(self, name: str) -> list[str]:
        num_ranks = self.ranks_by_group.get(name, 1)
        if num_ranks == 1:
            return [sys.executable]
        mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
        if mpiexec is None:
            raise LaunchError(f"group {name} has {num_ranks} ranks but mpiexec is not installed "
                              f"(pip install mpich, or the system's Open MPI)")
        return [mpiexec, "-n", str(num_ranks), sys.executable, "-m", "mpi4py"]

    async def wait_ready(self, registry: Registry, timeout_s: float) -> None:
        """Returns once every group registered with a status; else stops them all and raises LaunchError."""
        deadline_s = time.monotonic() + timeout_s
        while not registry.is_ready(self.group_names):
            exited = self.exited()
            if exited:
                await self.stop(keep_logs=True)
                raise LaunchError(self._describe_exit(exited[0]))
            if time.monotonic() > deadline_s:
                missing = [n for n in self.group_names if not registry.is_ready([n])]
                tails = "\n".join(f"--- {n} stderr ---\n{self.processes[n].stderr_tail()}" for n in missing)
                await self.stop(keep_logs=True)
                raise LaunchError(f"group(s) {', '.join(missing)} did not register within {timeout_s:g} s "
                                  f"(coordinator.startup_timeout_s); logs in {self.log_dir}\n{tails}")
            await registry.wait_changed(POLL_INTERVAL_S)

    def exited(self) -> list[tuple[str, int]]:
        """(group, exit code) of every process that has exited."""
        return [(name, code) for name, p in self.processes.items() if (code := p.process.poll()) is not None]

    async def watch(self, on_exit: Callable[[str, str], None], interval_s: float = 0.2) -> None:
        """Runs until cancelled: calls `on_exit(group, reason)` once for each process that exits."""
        reported: set[str] = set()
        while True:
            for name, code in self.exited():
                if name not in reported:
                    reported.add(name)
                    _kill_groups([self.processes[name]])  # ranks its leader left behind
                    on_exit(name, f"worker process exited with code {code}")
            await asyncio.sleep(interval_s)

    async def stop(self, grace_s: float = STOP_GRACE_S, keep_logs: bool = False) -> None:
        """SIGTERM every process group, SIGKILL what is left after `grace_s`, reap them all."""
        running = [p for p in self.processes.values() if p.process.poll() is None]
        for worker in running:
            worker.signal_group(signal.SIGTERM)
        deadline_s = time.monotonic() + grace_s
        while any(p.process.poll() is None for p in running) and time.monotonic() < deadline_s:
            await asyncio.sleep(POLL_INTERVAL_S)
        # Also groups whose leader just exited: ranks it spawned may live on in its process group
        # (whose id cannot have been reused while they do).
        _kill_groups(running)
        clean = all(p.process.returncode == 0 for p in self.processes.values())
        if self._owns_log_dir and clean and not keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)  # nothing went wrong: no logs worth keeping
        if self._atexit_registered:
            atexit.unregister(self.kill_all)
            self._atexit_registered = False

    def kill_all(self) -> None:
        """SIGKILL every group whose leader still runs (the atexit hook), then reap."""
        _kill_groups([p for p in self.processes.values() if p.process.poll() is None])

    def _describe_exit(self, exited: tuple[str, int]) -> str:
        name, code = exited
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return (f"group {name} {how} before it registered; logs in {self.log_dir}\n"
                f"--- {name} stderr (last lines) ---\n{self.processes[name].stderr_tail()}")


def _term_on_parent_death() -> None:
    """Runs in the child between fork and exec: ask Linux for SIGTERM when the parent dies."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _kill_groups(workers: Sequence[WorkerProcess]) -> None:
    for worker in workers:
        worker.signal_group(signal.SIGKILL)
    for worker in workers:
        try:
            worker.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            log.error("group %s (pid %d) did not die after SIGKILL", worker.group, worker.process.pid)
