"""Cluster configs: every example in cluster_configs/ loads, replicas
expand into named groups, and each invalid config's error names the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shardline.coordinator.cluster_config import (ClusterConfigError, load_cluster_config,
                                                  parse_cluster_config)

EXAMPLES = sorted((Path(__file__).parent.parent / "cluster_configs").glob("*.yaml"))
MINIMAL = {"groups": [{"name": "g0"}]}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load(path):
    config = load_cluster_config(path)
    specs = config.group_specs()
    assert specs and len({s.name for s in specs}) == len(specs)


def test_examples_present():
    assert {"local.yaml", "local-2-replicas.yaml"} <= {p.name for p in EXAMPLES}


def test_replicas_expand():
    config = load_cluster_config(Path(__file__).parent.parent / "cluster_configs" / "local-2-replicas.yaml")
    assert [s.name for s in config.group_specs()] == ["replica-0", "replica-1"]
    assert config.coordinator.router.policy == "kv_aware"


def test_defaults():
    config = parse_cluster_config(MINIMAL)
    assert config.coordinator.port == 50051 and config.coordinator.limits.max_in_flight == 256
    assert config.group_specs()[0].engine.model is None  # "default": the embedded model


def with_(path: str, value) -> dict:
    """MINIMAL with `value` set at the dotted `path` (numbers index lists)."""
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    keys = path.split(".")
    node = data
    for key in keys[:-1]:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    node[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value
    return data


@pytest.mark.parametrize("path, value, key", [
    ("coordinator.port", 70000, "coordinator.port"),
    ("coordinator.router.policy", "random", "coordinator.router.policy"),
    ("coordinator.router.busy_threshold", 0, "coordinator.router.busy_threshold"),
    ("coordinator.limits.max_in_flight", 0, "coordinator.limits.max_in_flight"),
    ("coordinator.limits.max_message_bytes", 10, "coordinator.limits.max_message_bytes"),
    ("coordinator.heartbeat_timeout_s", 0.1, "coordinator"),
    ("coordinator.bogus", 1, "coordinator.bogus"),
    ("launcher", "kubernetes", "launcher"),
    ("groups.0.tp", 0, "groups.0.tp"),
    ("groups.0.name", "bad name!", "groups.0.name"),
    ("groups.0.devices", [0, 1], "groups.0"),
    ("groups.0.engine", {"block_size_tokens": 0}, "groups.0.engine.block_size_tokens"),
    ("engine.max_num_seqs", 0, "engine.max_num_seqs"),
])
def test_invalid_configs_name_the_key(path, value, key):
    with pytest.raises(ClusterConfigError) as err:
        parse_cluster_config(with_(path, value), "cluster.yaml")
    assert f"cluster.yaml: {key}" in str(err.value)


def test_duplicate_group_names():
    with pytest.raises(ClusterConfigError, match="unique"):
        parse_cluster_config({"groups": [{"name": "a"}, {"name": "a"}]})


def test_no_groups():
    with pytest.raises(ClusterConfigError, match="groups"):
        parse_cluster_config({"groups": []})


def test_file_errors(tmp_path):
    with pytest.raises(ClusterConfigError, match="cannot read"):
        load_cluster_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("groups: [\n")
    with pytest.raises(ClusterConfigError, match="not valid YAML"):
        load_cluster_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ClusterConfigError, match="mapping"):
        load_cluster_config(scalar)


if __name__ == "__main__":
    pytest.main([__file__, "-q"])


def test_expert_parallel_must_match_tp():
    from shardline.coordinator.cluster_config import ClusterConfigError, parse_cluster_config
    with pytest.raises(ClusterConfigError, match=r"groups\.0: .*ep \(2\) must be 1 or equal tp \(1\)"):
        parse_cluster_config({"groups": [{"name": "moe", "ep": 2}]})
    assert parse_cluster_config({"groups": [{"name": "moe", "tp": 2, "ep": 2}]}).group_specs()[0].ep == 2


def test_disaggregated_layouts():
    config = parse_cluster_config({"groups": [{"name": "p", "role": "prefill", "tp": 2}, {"name": "d", "role": "decode"}],
                                   "coordinator": {"disaggregation": {"min_remote_prefill_tokens": 64}}})
    assert [s.role for s in config.group_specs()] == ["prefill", "decode"]
    assert config.coordinator.disaggregation.min_remote_prefill_tokens == 64
    with pytest.raises(ClusterConfigError, match=r"groups\.0: .*role 'prefill' needs pp = 1"):
        parse_cluster_config({"groups": [{"name": "p", "role": "prefill", "pp": 2}, {"name": "d"}]})
    with pytest.raises(ClusterConfigError, match="at least one must be 'decode' or 'mixed'"):
        parse_cluster_config({"groups": [{"name": "p", "role": "prefill"}]})
    with pytest.raises(ClusterConfigError, match=r"prefill_timeout_s \(40.0\) must be below group d's"):
        parse_cluster_config({"groups": [{"name": "d", "engine": {"remote_kv_timeout_s": 30}}],
                              "coordinator": {"disaggregation": {"prefill_timeout_s": 40}}})
    with pytest.raises(ClusterConfigError, match="min_remote_prefill_tokens"):
        parse_cluster_config({**MINIMAL, "coordinator": {"disaggregation": {"min_remote_prefill_tokens": 0}}})
