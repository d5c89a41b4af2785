"""The cluster config: one YAML file describes the model, the coordinator
and the engine groups. Validated with pydantic before anything starts;
errors name the offending key (`groups.1.tp: ...`).

Pure configuration: no process, network or model code here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shardline.coordinator.launch_config import RayLaunchConfig, SlurmLaunchConfig
from shardline.worker.engine_config import EngineConfig


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RouterConfig(_Frozen):
    policy: Literal["kv_aware", "round_robin", "least_loaded"] = "kv_aware"
    overlap_weight: float = Field(1.0, ge=0)      # cost per uncached prompt block
    temperature: float = Field(0.0, ge=0)         # 0: argmin; > 0: softmax over -cost / T
    busy_threshold: float = Field(0.95, gt=0, le=1)  # skip groups whose KV usage is above this
    recent_load_half_life_s: float = Field(5.0, gt=0)  # argmin ties go to the group routed least lately


class DisaggregationConfig(_Frozen):
    # Prefill on a prefill group only when this many prompt tokens are not cached on the decode group.
    min_remote_prefill_tokens: int = Field(256, ge=1)
    # A prefill group with this many prefills in flight is busy; all busy: prefill where it decodes.
    max_prefill_in_flight: int = Field(8, ge=1)
    # A remote prefill taking longer falls back to local; below every decode group's
    # engine.remote_kv_timeout_s, so the coordinator gives up before the reservation expires.
    prefill_timeout_s: float = Field(20.0, gt=0)
    # How the KV travels (coordinator/kv_links.py): auto = an NCCL pair link where both leaders
    # are on GPUs, else the PushKV stream; nccl / tcp ask for that link; grpc never opens one.
    transport: Literal["auto", "grpc", "nccl", "tcp"] = "auto"


class LimitsConfig(_Frozen):
    max_in_flight: int = Field(256, ge=1)        # admitted requests; beyond: RESOURCE_EXHAUSTED
    max_tokens: int = Field(4096, ge=1)          # upper bound on a request's max_tokens
    max_message_bytes: int = Field(4 << 20, ge=1024)
    default_max_tokens: int = Field(256, ge=1)


class TLSConfig(_Frozen):
    cert_file: Path
    key_file: Path


class CoordinatorConfig(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)        # 0: pick a free port
    metrics_port: int | None = Field(None, ge=0, le=65535)  # Prometheus; None: off
    router: RouterConfig = RouterConfig()
    disaggregation: DisaggregationConfig = DisaggregationConfig()
    limits: LimitsConfig = LimitsConfig()
    heartbeat_interval_s: float = Field(0.5, gt=0)
    heartbeat_timeout_s: float = Field(3.0, gt=0)
    startup_timeout_s: float = Field(180.0, gt=0)
    tls: TLSConfig | None = None
    auth_token_env: str | None = None  # name of the env var holding the bearer token

    @model_validator(mode="after")
    def _timeouts(self) -> "CoordinatorConfig":
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_timeout_s must exceed heartbeat_interval_s")
        return self


class GroupConfig(_Frozen):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    role: Literal["mixed", "prefill", "decode"] = "mixed"
    replicas: int = Field(1, ge=1)
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    ep: int = Field(1, ge=1)
    # Decoder layers per pipeline stage, e.g. [10, 14]; None: split by parameter cost.
    # Their sum must be the model's layer count, checked when the model loads.
    pp_layers: list[int] | None = None
    devices: list[int] = Field(default_factory=list)  # GPU ids for one replica's ranks; [] on CPU
    engine: dict = Field(default_factory=dict)         # overrides of the cluster's engine settings

    @model_validator(mode="after")
    def _expert_parallel(self) -> "GroupConfig":
        # Served groups spread experts over their tensor-parallel ranks.
        if self.ep not in (1, self.tp):
            raise ValueError(f"ep ({self.ep}) must be 1 or equal tp ({self.tp}): experts are spread over "
                             f"the tensor-parallel ranks")
        return self

    @model_validator(mode="after")
    def _devices(self) -> "GroupConfig":
        if self.devices and len(self.devices) != self.tp * self.pp:
            raise ValueError(f"devices lists {len(self.devices)} GPUs but tp * pp = {self.tp * self.pp}")
        return self

    @model_validator(mode="after")
    def _pp_layers(self) -> "GroupConfig":
        if self.pp_layers is None:
            return self
        if len(self.pp_layers) != self.pp:
            raise ValueError(f"pp_layers lists {len(self.pp_layers)} stages but pp = {self.pp}")
        if min(self.pp_layers) < 1:
            raise ValueError(f"pp_layers {self.pp_layers}: every stage needs at least one layer")
        return self

    @model_validator(mode="after")
    def _handoff_needs_one_stage(self) -> "GroupConfig":
        if self.role != "mixed" and self.pp != 1:
            raise ValueError(f"role {self.role!r} needs pp = 1 (KV hand-off between pipeline stages "
                             f"is not supported), got pp = {self.pp}")
        return self


class GroupSpec(_Frozen):
    """One engine group (one replica) after expanding `replicas`."""

    name: str
    role: str
    tp: int
    pp: int
    ep: int
    devices: list[int]
    engine: EngineConfig
    pp_layers: tuple[int, ...] | None = None


class ClusterConfig(_Frozen):
    model: str = "default"                 # path, or "default" for the embedded model
    served_model_name: str = "default"     # the name clients pass as `model`
    launcher: Literal["local", "ray", "slurm"] = "local"
    ray: RayLaunchConfig = RayLaunchConfig()        # used with launcher: ray
    slurm: SlurmLaunchConfig = SlurmLaunchConfig()  # used by `shardline leader` (Slurm leader mode)
    coordinator: CoordinatorConfig = CoordinatorConfig()
    engine: EngineConfig = EngineConfig()
    groups: list[GroupConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> "ClusterConfig":
        names = [g.name for g in self.groups]
        if len(names) != len(set(names)):
            raise ValueError(f"group names must be unique, got {names}")
        return self

    @model_validator(mode="after")
    def _someone_decodes(self) -> "ClusterConfig":
        if all(g.role == "prefill" for g in self.groups):
            raise ValueError("groups: every group has role 'prefill'; at least one must be 'decode' or 'mixed'")
        return self

    @model_validator(mode="after")
    def _reservations_outlive_prefills(self) -> "ClusterConfig":
        prefill_timeout_s = self.coordinator.disaggregation.prefill_timeout_s
        try:
            specs = self.group_specs()
        except ValidationError:
            return self   # a bad engine override: parse_cluster_config reports it with its key
        for spec in specs:
            if spec.role != "prefill" and spec.engine.remote_kv_timeout_s <= prefill_timeout_s:
                raise ValueError(f"coordinator.disaggregation.prefill_timeout_s ({prefill_timeout_s}) must be "
                                 f"below group {spec.name}'s engine.remote_kv_timeout_s "
                                 f"({spec.engine.remote_kv_timeout_s})")
        return self

    def group_specs(self) -> list[GroupSpec]:
        specs = []
        for group in self.groups:
            engine = EngineConfig(**{**self.engine.model_dump(), **group.engine,
                                     "model": None if self.model == "default" else self.model})
            for replica in range(group.replicas):
                name = group.name if group.replicas == 1 else f"{group.name}-{replica}"
                specs.append(GroupSpec(name=name, role=group.role, tp=group.tp, pp=group.pp, ep=group.ep,
                                       devices=group.devices, engine=engine,
                                       pp_layers=tuple(group.pp_layers) if group.pp_layers else None))
        return specs


class ClusterConfigError(ValueError):
    """A cluster config that cannot be used; the message names file and key."""


def _format(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        key = prefix + ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"{key}: {e['msg']}")
    return "; ".join(lines)


def parse_cluster_config(data: object, source: str = "<config>") -> ClusterConfig:
    if not isinstance(data, dict):
        raise ClusterConfigError(f"{source}: expected a mapping at the top level")
    try:
        config = ClusterConfig.model_validate(data)
    except ValidationError as err:
        raise ClusterConfigError(f"{source}: {_format(err)}") from None
    for index, group in enumerate(config.groups):
        try:
            EngineConfig(**{**config.engine.model_dump(), **group.engine})
        except ValidationError as err:
            raise ClusterConfigError(f"{source}: {_format(err, f'groups.{index}.engine.')}") from None
    return config


def load_cluster_config(path: str | Path) -> ClusterConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ClusterConfigError(f"{path}: cannot read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ClusterConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_cluster_config(data, str(path))
