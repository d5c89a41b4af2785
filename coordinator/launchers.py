"""Picks the launcher of a cluster config's `launcher:` mode for the
coordinator: `local` (LocalLauncher, the default) or `ray` (RayLauncher).
The `slurm` mode has no launcher here: in leader mode `srun` starts every
rank and global rank 0 runs the coordinator (worker/leader_mode.py).

Every launcher offers start(), wait_ready(registry, timeout_s),
watch(on_exit) and stop(). This module must not start anything itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

from shardline.coordinator.cluster_config import ClusterConfig, ClusterConfigError
from shardline.coordinator.launcher import LocalLauncher

SLURM_HINT = "slurm leader mode is started by srun, not by serve: srun shardline leader -c FILE"


def with_overrides(config: ClusterConfig, launcher: str | None, ray_address: str | None) -> ClusterConfig:
    """The config with the command line's --launcher and --address applied."""
    if launcher is not None:
        config = config.model_copy(update={"launcher": launcher})
    if ray_address is not None:
        if config.launcher != "ray":
            raise ClusterConfigError("--address: only for --launcher ray")
        config = config.model_copy(update={"ray": config.ray.model_copy(update={"address": ray_address})})
    return config


def check_launchable(config: ClusterConfig) -> None:
    """ClusterConfigError for a mode `shardline serve` cannot start, before anything runs."""
    if config.launcher == "slurm":
        raise ClusterConfigError(f"launcher: {SLURM_HINT}")


def make_launcher(config: ClusterConfig, config_path: str | Path, group_names: Sequence[str],
                  control_address: str) -> Union[LocalLauncher, "RayLauncher"]:  # noqa: F821
    check_launchable(config)
    if config.launcher == "ray":
        from shardline.coordinator.ray_launcher import RayLauncher  # imports ray: only when asked for
        return RayLauncher(config, config_path, control_address)
    ranks = {spec.name: spec.tp * spec.pp for spec in config.group_specs()}
    return LocalLauncher(config_path, group_names, control_address, ranks_by_group=ranks)
