"""`LocalServer` (what `shardline demo` and the load benchmark use to run
`shardline serve`) with small fake servers in place of the coordinator:
the free-port config copy, the ready file, the error with the server's
output tail, and a stop that leaves no process behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shardline.client.local_server import LocalServer, ServerStartError, free_port_config

REPO = Path(__file__).resolve().parents[1]

# argv: -c CONFIG --ready-file PATH; MODE picks the behaviour; the child pid
# goes to CHILD_PID so the test can check that it is gone afterwards.
FAKE_SERVE = """
import os, signal, subprocess, sys, time, yaml
config, ready = sys.argv[2], sys.argv[4]  # -c CONFIG --ready-file PATH
mode = os.environ["MODE"]
if mode == "crash":
    print("boom: bad config key", file=sys.stderr)
    sys.exit(2)
child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                          "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
open(os.environ["CHILD_PID"], "w").write(str(child.pid))
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode != "never_ready":
    port = yaml.safe_load(open(config))["coordinator"]["port"]
    open(ready + ".tmp", "w").write(f"127.0.0.1:{port or 4242}")
    os.replace(ready + ".tmp", ready)
print("serving", flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose (its parent, the fake server, is gone).
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "zombie" in status.read_text())


@pytest.fixture
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_serve.py"
    script.write_text(FAKE_SERVE)
    monkeypatch.setenv("CHILD_PID", str(tmp_path / "child.pid"))

    def make(mode: str, **kwargs) -> LocalServer:
        monkeypatch.setenv("MODE", mode)
        return LocalServer(REPO / "cluster_configs/local.yaml", command=[sys.executable, str(script)],
                           **kwargs)
    return make


def child_pid(tmp_path) -> int:
    return int((tmp_path / "child.pid").read_text())


def test_config_copy_takes_a_free_port_and_drops_metrics(tmp_path):
    copy = yaml.safe_load(free_port_config(REPO / "cluster_configs/local.yaml", tmp_path,
                                           {"engine": {"backend": "numpy"}}).read_text())
    assert copy["coordinator"]["port"] == 0 and copy["coordinator"]["metrics_port"] is None
    assert copy["engine"] == {"backend": "numpy", "num_kv_blocks": 1024, "max_num_seqs": 64}
    assert copy["groups"] == [{"name": "g0", "role": "mixed"}]


def test_start_reads_the_address_and_stop_kills_the_group(fake, tmp_path):
    with fake("ok") as server:
        assert server.address == "127.0.0.1:4242"
        pid = child_pid(tmp_path)
        assert alive(pid)
    # The child ignores SIGTERM and its parent did not stop it: the group SIGKILL did.
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)


def test_a_server_ignoring_sigterm_is_killed(fake, tmp_path):
    server = fake("stubborn")
    server.start()
    start = time.monotonic()
    server.stop(grace_s=0.5)
    assert time.monotonic() - start < 5
    server.close()


def test_a_crashing_server_reports_its_output(fake):
    with pytest.raises(ServerStartError, match=r"exited with code 2(.|\n)*boom: bad config key"):
        with fake("crash"):
            pass


def test_startup_timeout_reports_the_output_tail(fake, tmp_path):
    with pytest.raises(ServerStartError, match=r"not ready within 3 s(.|\n)*serving"):
        with fake("never_ready", startup_timeout_s=3):
            pass
    time.sleep(0.2)
    assert not alive(child_pid(tmp_path))


# A stand-in for `shardline serve`: a real Shardline gRPC server that answers
# every prompt with "Paris.", stopping cleanly on SIGTERM.
FAKE_CLUSTER = """
import os, signal, sys, threading
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2_grpc
from shardline.proto import shardline_pb2 as pb, shardline_pb2_grpc as pb_grpc

class Paris(pb_grpc.ShardlineServicer):
    def Generate(self, request, context):
        assert request.chat and request.prompt == "What is the capital of France?"
        for piece in ("Par", "is", "."):
            yield pb.GenerateResponse(text=piece)
        yield pb.GenerateResponse(finish_reason=pb.FINISH_REASON_STOP)

server = grpc.server(futures.ThreadPoolExecutor(4))
pb_grpc.add_ShardlineServicer_to_server(Paris(), server)
health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
stopped = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stopped.set())   # before it says it is ready
open(sys.argv[4] + ".tmp", "w").write(f"127.0.0.1:{port}")
os.replace(sys.argv[4] + ".tmp", sys.argv[4])
stopped.wait()
server.stop(None)
print("stopped cleanly", flush=True)
"""


def test_demo_streams_the_answer_and_stops_the_cluster(tmp_path, monkeypatch, capsys):
    from shardline.client import cli, local_server
    script = tmp_path / "fake_cluster.py"
    script.write_text(FAKE_CLUSTER)
    monkeypatch.setattr(local_server, "SERVE_COMMAND", (sys.executable, str(script)))
    stops = []
    original_stop = LocalServer.stop
    monkeypatch.setattr(LocalServer, "stop", lambda self, *a: stops.append(
        (self.process, original_stop(self, *a), self.tail())))
    assert cli.main(["demo", "-c", str(REPO / "cluster_configs/local.yaml")]) == 0
    out, err = capsys.readouterr()
    assert out == "Paris.\n" and "cluster ready on 127.0.0.1:" in err
    (process, code, tail), = stops
    assert code == 0 and "stopped cleanly" in tail and process.poll() == 0


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardline.client.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


@pytest.mark.slow
def test_cli_against_a_real_local_cluster():
    with LocalServer(REPO / "cluster_configs/local.yaml", overrides={"engine": {"backend": "numpy"}}) as server:
        answer = run_cli("generate", "--url", server.address, "--chat", "--max-tokens", "16",
                         "What is the capital of France?")
        assert answer.returncode == 0 and "Paris" in answer.stdout, answer.stderr
        status = run_cli("status", "--url", server.address, "--plain")
        assert status.returncode == 0 and "model smollm2-135m-instruct" in status.stdout
        assert [line.split()[:3] for line in status.stdout.splitlines() if line.startswith("g0")] == \
            [["g0", "mixed", "yes"]]
        bad = run_cli("generate", "--url", server.address, "--top-p", "0", "hi")
        assert bad.returncode == 2 and "INVALID_ARGUMENT: sampling.top_p must be in (0, 1]" in bad.stderr


@pytest.mark.slow
def test_demo_end_to_end():
    result = run_cli("demo")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "capital of France?" not in result.stdout
