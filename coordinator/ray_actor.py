"""`GroupActor`: one engine group on a Ray node, created by RayLauncher in
the group's placement group.

The actor starts the group's ranks with a LocalLauncher (`mpiexec` for a
multi-rank group) and watches them. When the group's processes die, the
actor exits, so Ray restarts it (up to `ray.max_restarts`) and the new
incarnation starts the group again, which registers with the coordinator
under the same name. The children get SIGTERM should the actor itself be
killed (PR_SET_PDEATHSIG), so no rank outlives it.

It runs on Ray workers: it must not route, and it talks to the coordinator
only through the workers it starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from shardline.coordinator.launch_config import advertised_host
from shardline.coordinator.launcher import LocalLauncher

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.2
EXIT_GROUP_DIED = 1


class GroupActor:
    def __init__(self, name: str, config_text: str, num_ranks: int, coordinator_address: str,
                 worker_host: str):
        import ray  # on a Ray worker: ray is there
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s ray-group[{name}] %(levelname)s: %(message)s")
        self.name = name
        # The config travels as text: the driver's file need not exist on this node.
        self._folder = Path(tempfile.mkdtemp(prefix=f"shardline-{name}-"))
        config_path = self._folder / "cluster.yaml"
        config_path.write_text(config_text)
        advertise = advertised_host(worker_host, ray.util.get_node_ip_address())
        self._launcher = LocalLauncher(config_path, [name], coordinator_address, log_dir=self._folder / "logs",
                                       ranks_by_group={name: num_ranks},
                                       worker_args=["--host", worker_host, "--advertise-host", advertise],
                                       die_with_parent=True)
        self._stopping = threading.Event()
        self._launcher.start()
        log.info("group %s started (%d rank(s)), logs in %s", name, num_ranks, self._launcher.log_dir)
        threading.Thread(target=self._watch, name="group-watch", daemon=True).start()

    def ping(self) -> int:
        return os.getpid()

    def stderr_tail(self) -> str:
        return self._launcher.processes[self.name].stderr_tail()

    def stop(self) -> None:
        """Stops the group (SIGTERM, then SIGKILL after a grace period); the actor stays up."""
        self._stopping.set()
        asyncio.run(self._launcher.stop())
        shutil.rmtree(self._folder, ignore_errors=True)

    def _watch(self) -> None:
        while not self._stopping.wait(WATCH_INTERVAL_S):
            exited = self._launcher.exited()
            if not exited or self._stopping.is_set():
                continue
            code = exited[0][1]
            log.error("group %s exited with code %d; the actor exits so Ray restarts it\n%s",
                      self.name, code, self.stderr_tail())
            self._launcher.kill_all()       # ranks its leader may have left behind
            time.sleep(0.1)                 # let the log line reach Ray's log monitor
            os._exit(EXIT_GROUP_DIED)       # atexit hooks would only repeat kill_all
