"""Choosing a launch mode: the command line's --launcher/--address over the
config, clear errors for `slurm` under `serve` and for `ray` without the
ray package, and the address rule both modes advertise by."""

from __future__ import annotations

import pytest

from shardline.coordinator import ray_launcher
from shardline.coordinator.cluster_config import ClusterConfigError, parse_cluster_config
from shardline.coordinator.launch_config import advertised_host
from shardline.coordinator.launcher import LaunchError, LocalLauncher
from shardline.coordinator.launchers import check_launchable, make_launcher, with_overrides
from shardline.coordinator.server import serve

CONFIG = {"groups": [{"name": "g", "tp": 2}]}


def test_command_line_overrides_the_config():
    config = with_overrides(parse_cluster_config(CONFIG), "ray", "local")
    assert (config.launcher, config.ray.address) == ("ray", "local")
    assert with_overrides(config, None, None) == config
    with pytest.raises(ClusterConfigError, match="--address: only for --launcher ray"):
        with_overrides(parse_cluster_config(CONFIG), "local", "auto")


def test_local_stays_the_default(tmp_path):
    launcher = make_launcher(parse_cluster_config(CONFIG), tmp_path / "c.yaml", ["g"], "127.0.0.1:1")
    assert isinstance(launcher, LocalLauncher) and launcher.ranks_by_group == {"g": 2}


def test_serve_refuses_slurm_and_points_at_srun(tmp_path, capsys):
    with pytest.raises(ClusterConfigError, match="srun shardline leader -c FILE"):
        check_launchable(parse_cluster_config({**CONFIG, "launcher": "slurm"}))
    path = tmp_path / "cluster.yaml"
    path.write_text("launcher: slurm\ngroups: [{name: g}]\n")
    assert serve(str(path)) == 2
    assert "srun shardline leader" in capsys.readouterr().err


def test_ray_launcher_without_ray_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(ray_launcher, "ray", None)
    path = tmp_path / "cluster.yaml"
    path.write_text("launcher: ray\ngroups: [{name: g}]\n")
    with pytest.raises(LaunchError, match="the ray package is not installed"):
        make_launcher(parse_cluster_config({**CONFIG, "launcher": "ray"}), path, ["g"], "127.0.0.1:1")


def test_wildcard_hosts_advertise_the_node():
    assert advertised_host("127.0.0.1", "10.0.0.5") == "127.0.0.1"
    assert advertised_host("0.0.0.0", "10.0.0.5") == "10.0.0.5"
    assert advertised_host("0.0.0.0") not in ("", "0.0.0.0")
