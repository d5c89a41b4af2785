"""The worker process's lifecycle, against the control plane of
test_worker_service: a group it cannot serve is a clear error (exit code 2),
SIGTERM aborts in-flight requests and exits 0, a worker exits when its
parent dies, and its start-up objects leave the collector. Same fixtures as test_worker_service.py (control, config_path);
every worker started here is killed at module teardown.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from shardline.proto import worker_pb2_grpc
from shardline.worker.sampling_params import SamplingParams
from test_worker_service import (  # noqa: F401  (fixtures: config_path, control)
    config_path,
    control,
    generate_request,
    launch_worker,
    stop_process,
    wait_registered,
    worker_command,
)


@pytest.mark.parametrize("group, message", [("nope", "groups are: g0, g-term, g-orphan, g-tp"),
                                            ("g-tp", "tp=2 needs an MPI world of 2 ranks")])
def test_a_group_it_cannot_serve_is_a_clear_error(config_path, control, group, message):
    result = subprocess.run(worker_command(config_path, group, control), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and message in result.stderr


def process_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


@dataclass
class DoomedWorkers:
    term: subprocess.Popen      # group g-term, for SIGTERM
    term_address: str
    launcher: subprocess.Popen  # `sh -c` running group g-orphan, to be killed
    orphan_pid: int


@pytest.fixture(scope="module")
def doomed(request, config_path, control) -> DoomedWorkers:
    """Two more workers started together, so their model loads overlap."""
    term = launch_worker(request, config_path, "g-term", control)
    log_path = shlex.quote(str(config_path.parent / "g-orphan.err"))
    command = shlex.join(worker_command(config_path, "g-orphan", control))
    launcher = subprocess.Popen(["sh", "-c", f"{command} 2>{log_path} & echo $!; wait"],
                                stdout=subprocess.PIPE, text=True)
    request.addfinalizer(lambda: stop_process(launcher))
    orphan_pid = int(launcher.stdout.readline())
    request.addfinalizer(lambda: process_gone(orphan_pid) or os.kill(orphan_pid, signal.SIGKILL))
    term_address = wait_registered(control, "g-term", config_path.parent / "g-term.err")
    wait_registered(control, "g-orphan", config_path.parent / "g-orphan.err")
    return DoomedWorkers(term, term_address, launcher, orphan_pid)


def test_sigterm_aborts_in_flight_requests_and_exits_0(doomed):
    with grpc.insecure_channel(doomed.term_address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        params = SamplingParams(max_tokens=3000, temperature=0.0, ignore_eos=True)
        call = stub.Generate(generate_request("in-flight", [1, 2, 3], params), timeout=60)
        next(call)
        doomed.term.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert doomed.term.wait(timeout=10) == 0


def test_worker_exits_when_its_parent_dies(doomed):
    doomed.launcher.kill()
    doomed.launcher.wait(5)
    deadline_s = time.monotonic() + 10
    while not process_gone(doomed.orphan_pid):
        assert time.monotonic() < deadline_s, "the worker outlived its parent"
        time.sleep(0.05)


def test_startup_objects_leave_the_collectors_generations():
    """Once its engine is up, a worker (and each follower rank) freezes what is alive
    (rank_main.freeze_startup_objects): later collections skip it. Garbage made before is
    collected first, not frozen."""
    import gc
    import weakref

    from shardline.worker.rank_main import freeze_startup_objects

    class Node:
        pass
    garbage = Node()
    garbage.me = garbage
    collected = weakref.ref(garbage)
    del garbage
    alive = Node()
    alive.me = alive
    try:
        freeze_startup_objects()
        assert collected() is None
        assert gc.get_freeze_count() > 0 and not any(o is alive for o in gc.get_objects())
    finally:
        gc.unfreeze()   # the test process goes on collecting as before
    assert any(o is alive for o in gc.get_objects())
