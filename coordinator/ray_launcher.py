"""`RayLauncher`: runs a cluster's engine groups on a Ray cluster; the
coordinator stays in the driver (the process that runs `shardline serve
--launcher ray`, or the entrypoint of `ray job submit`).

For each group: a placement group of one bundle holding the group's CPUs
and GPUs (`ray.cpus_per_rank` / `ray.gpus_per_rank` times tp * pp) with
STRICT_PACK, so the group's ranks share one node (its tensor-parallel
traffic stays on NVLink) and Ray hands the actor exactly those GPUs in
CUDA_VISIBLE_DEVICES; then a GroupActor in that bundle, restartable
(`max_restarts`), which starts the group's ranks. The launcher pings the
actors: an actor that is dead or restarting marks its group unhealthy, so
the router skips it until the restarted group registers again. `stop`
stops the groups, kills the actors and removes the placement groups; it
shuts Ray down only if it started it.

It must not route or judge health beyond "the actor answers"; readiness
is read from the Registry, as for the LocalLauncher.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from shardline.coordinator.cluster_config import ClusterConfig, GroupSpec
from shardline.coordinator.launch_config import WILDCARD_HOSTS
from shardline.coordinator.launcher import POLL_INTERVAL_S, LaunchError
from shardline.coordinator.registry import Registry

try:
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
except ImportError:  # `--launcher ray` says so when asked for; the module stays importable
    ray = None

log = logging.getLogger(__name__)

PING_TIMEOUT_S = 5.0
WATCH_INTERVAL_S = 0.5
STOP_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class ActorCheck:
    answered: bool
    reason: str = ""             # why not, when it did not answer
    dead_for_good: bool = False  # Ray will not restart it


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def require_ray() -> None:
    if ray is None:
        raise LaunchError("launcher ray: the ray package is not installed (pip install 'ray>=2.50', "
                          "or pip install -e '.[dev]')")


class RayLauncher:
    def __init__(self, config: ClusterConfig, config_path: str | Path, control_address: str):
        require_ray()
        self.config, self.settings = config, config.ray
        self.config_text = Path(config_path).read_text()
        self.specs = config.group_specs()
        self.group_names = [spec.name for spec in self.specs]
        self.control_address = control_address
        self.placement_groups: dict[str, PlacementGroup] = {}
        self.actors: dict[str, object] = {}     # group name -> ray ActorHandle
        self._owns_ray = False
        self._atexit_registered = False
        self._started_s = 0.0

    # -- start ------------------------------------------------------------------

    def start(self) -> None:
        self._connect()
        address = self._reachable_control_address()
        atexit.register(self.kill_all)
        self._atexit_registered = True
        self._started_s = time.monotonic()
        for spec in self.specs:  # neither call blocks: the actor waits for its placement group
            self.placement_groups[spec.name] = placement_group([self._bundle(spec)], strategy="STRICT_PACK",
                                                               name=f"shardline-{spec.name}")
            self.actors[spec.name] = self._spawn(spec, address)
            log.info("group %s: placement group %s, actor created", spec.name,
                     self.placement_groups[spec.name].id.hex())

    def _connect(self) -> None:
        if ray.is_initialized():  # the caller (a test, a notebook) set Ray up: use its cluster
            return
        address = self.settings.address
        # ray.init replaces SIGTERM's handler with its crash reporter, which would skip our clean stop
        # (placement groups left behind): the handlers from before (serve's asyncio loop) are put back.
        in_main_thread = threading.current_thread() is threading.main_thread()
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} if in_main_thread else {}
        try:
            ray.init(address=address, namespace=self.settings.namespace)
        except (ConnectionError, RuntimeError, ValueError) as err:
            hint = " (start one with `ray start --head`, or use --address local)" if address == "auto" else ""
            raise LaunchError(f"ray.address {address!r}: cannot connect to a Ray cluster{hint}: {err}") from None
        finally:
            for signum, handler in handlers.items():
                if handler is not None:
                    signal.signal(signum, handler)
        self._owns_ray = True

    def _reachable_control_address(self) -> str:
        """Workers on other nodes cannot dial 127.0.0.1: behind a wildcard host, give this node's IP."""
        if self.config.coordinator.host not in WILDCARD_HOSTS:
            return self.control_address
        return f"{ray.util.get_node_ip_address()}:{self.control_address.rsplit(':', 1)[1]}"

    def _bundle(self, spec: GroupSpec) -> dict[str, float]:
        num_ranks = spec.tp * spec.pp
        bundle = {"CPU": self.settings.cpus_per_rank * num_ranks, "GPU": self.settings.gpus_per_rank * num_ranks}
        return {key: amount for key, amount in bundle.items() if amount > 0}

    def _unplaced(self) -> list[str]:
        """Groups whose placement group Ray has not reserved yet."""
        table = ray.util.placement_group_table()
        return [name for name, group in self.placement_groups.items()
                if table.get(group.id.hex(), {}).get("state") != "CREATED"]

    def _spawn(self, spec: GroupSpec, coordinator_address: str):
        from shardline.coordinator.ray_actor import GroupActor
        bundle = self._bundle(spec)
        strategy = PlacementGroupSchedulingStrategy(placement_group=self.placement_groups[spec.name],
                                                    placement_group_bundle_index=0)
        actor_class = ray.remote(GroupActor).options(
            num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0), scheduling_strategy=strategy,
            max_restarts=self.settings.max_restarts, max_task_retries=0)
        return actor_class.remote(spec.name, self.config_text, spec.tp * spec.pp, coordinator_address,
                                  self.settings.worker_host)

    # -- readiness and health ----------------------------------------------------

    def probe(self, name: str) -> ActorCheck:
        """Whether the group's actor answers a ping (blocking: run it in a thread)."""
        try:
            ray.get(self.actors[name].ping.remote(), timeout=PING_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            return ActorCheck(False, f"its Ray actor did not answer within {PING_TIMEOUT_S:g} s")
        except ray.exceptions.ActorDiedError as err:   # no restart left (or killed for good)
            return ActorCheck(False, f"its Ray actor died and will not restart ({_first_line(err)})", True)
        except ray.exceptions.RayActorError as err:    # ActorUnavailableError: restarting
            return ActorCheck(False, f"its Ray actor is restarting ({type(err).__name__}: {_first_line(err)})")
        return ActorCheck(True)

    async def wait_ready(self, registry: Registry, timeout_s: float) -> None:
        """Returns once every group registered; else stops them all and raises LaunchError naming the groups."""
        deadline_s = time.monotonic() + timeout_s
        next_probe_s = time.monotonic()
        while not registry.is_ready(self.group_names):
            if time.monotonic() >= next_probe_s:
                unplaced = await self._fail_on_unplaced_group()
                await self._fail_on_dead_actor([n for n in self.group_names
                                                if n not in unplaced and not registry.is_ready([n])])
                next_probe_s = time.monotonic() + WATCH_INTERVAL_S
            if time.monotonic() > deadline_s:
                missing = [n for n in self.group_names if not registry.is_ready([n])]
                tails = "\n".join([f"--- {n} stderr ---\n{await self._stderr_tail(n)}" for n in missing])
                await self.stop()
                raise LaunchError(f"group(s) {', '.join(missing)} did not register within {timeout_s:g} s "
                                  f"(coordinator.startup_timeout_s) on Ray\n{tails}")
            await registry.wait_changed(POLL_INTERVAL_S)

    async def _fail_on_unplaced_group(self) -> list[str]:
        """The groups still waiting for their resources; LaunchError once they waited too long."""
        unplaced = await asyncio.to_thread(self._unplaced)
        if unplaced and time.monotonic() - self._started_s > self.settings.placement_timeout_s:
            wanted = {name: self._bundle(spec) for spec in self.specs if (name := spec.name) in unplaced}
            free = {key: amount for key, amount in (await asyncio.to_thread(ray.available_resources)).items()
                    if key in ("CPU", "GPU")}
            await self.stop()
            raise LaunchError(f"group(s) {', '.join(unplaced)}: Ray could not reserve {wanted} (each on one node) "
                              f"within {self.settings.placement_timeout_s:g} s (ray.placement_timeout_s); "
                              f"free in the cluster: {free}")
        return unplaced

    async def _fail_on_dead_actor(self, names: list[str]) -> None:
        checks = await asyncio.gather(*(asyncio.to_thread(self.probe, name) for name in names))
        for name, check in zip(names, checks):
            if check.dead_for_good:
                await self.stop()
                raise LaunchError(f"group {name} did not come up: {check.reason}; its actor's log lines "
                                  f"(ray-group[{name}]) above show the group's stderr")

    async def _stderr_tail(self, name: str) -> str:
        try:
            return await asyncio.to_thread(ray.get, self.actors[name].stderr_tail.remote(), timeout=PING_TIMEOUT_S)
        except (ray.exceptions.RayError, KeyError) as err:
            return f"(no stderr: {type(err).__name__})"

    async def watch(self, on_exit: Callable[[str, str], None], interval_s: float = WATCH_INTERVAL_S) -> None:
        """Runs until cancelled: `on_exit(group, reason)` each time a group's actor stops answering."""
        failing: set[str] = set()
        while True:
            checks = await asyncio.gather(*(asyncio.to_thread(self.probe, n) for n in self.group_names))
            for name, check in zip(self.group_names, checks):
                if check.answered:
                    failing.discard(name)
                elif name not in failing:
                    failing.add(name)
                    on_exit(name, check.reason)
            await asyncio.sleep(interval_s)

    # -- stop ---------------------------------------------------------------------

    async def stop(self, grace_s: float = STOP_TIMEOUT_S, keep_logs: bool = False) -> None:
        """Stops every group (its actor SIGTERMs the ranks), kills the actors, removes the placement groups."""
        stops = [actor.stop.remote() for actor in self.actors.values()]
        if stops:
            await asyncio.to_thread(ray.wait, stops, num_returns=len(stops), timeout=grace_s)
        await asyncio.to_thread(self.kill_all)

    def kill_all(self) -> None:
        """Kills the actors (their ranks get SIGTERM as they die) and frees their GPUs; the atexit hook."""
        if ray is None or not ray.is_initialized():
            return
        for actor in self.actors.values():
            try:
                ray.kill(actor, no_restart=True)
            except ray.exceptions.RayError:
                pass
        for group in self.placement_groups.values():
            try:
                remove_placement_group(group)
            except ray.exceptions.RayError:
                pass
        self.actors.clear()
        self.placement_groups.clear()
        if self._atexit_registered:
            atexit.unregister(self.kill_all)
            self._atexit_registered = False
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False
