"""Starts a whole cluster: the coordinator's gRPC server (client API
`Shardline`, control plane `Coordinator`, grpc health, server reflection),
its metrics endpoint, and the engine groups through the LocalLauncher; and
`serve`, the blocking entry behind `shardline serve -c FILE`.

Wiring only: the pieces it joins (registry, prefix index, router, API,
launcher) hold the logic. It must not import cupy or model code.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from shardline.coordinator.api import SERVICE_NAME, ShardlineServicer
from shardline.coordinator.cluster_config import ClusterConfig, ClusterConfigError, load_cluster_config
from shardline.coordinator.control import CoordinatorServicer
from shardline.coordinator.launcher import LaunchError, LocalLauncher
from shardline.coordinator.launchers import check_launchable, make_launcher, with_overrides
from shardline.coordinator.metrics import Metrics, MetricsServer, serve_metrics
from shardline.coordinator.prefix_index import KVEventFollower, PrefixIndex
from shardline.coordinator.registry import Registry
from shardline.coordinator.router import Router
from shardline.coordinator.validation import RequestPreparer, load_tokenizer
from shardline.models.errors import ModelLoadError
from shardline.proto import worker_pb2, worker_pb2_grpc
from shardline.worker.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CONTROL_SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name
STOP_GRACE_S = 2.0


@dataclass
class Cluster:
    config: ClusterConfig
    address: str                 # host:port of the client API
    control_address: str         # where workers register (the same port unless TLS is on)
    registry: Registry
    prefix_index: PrefixIndex
    router: Router
    api: ShardlineServicer
    metrics: Metrics
    _servers: list[grpc.aio.Server]
    _health: health_aio.HealthServicer
    _followers: KVEventFollower
    _metrics_server: MetricsServer | None = None
    _launcher: LocalLauncher | None = None
    _tasks: list[asyncio.Task] = field(default_factory=list)

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_server.port if self._metrics_server else None

    @property
    def launcher(self) -> LocalLauncher | None:
        return self._launcher

    async def stop(self) -> None:
        """Background readers and tasks, the workers (their streams end), then the servers and channels."""
        await self._health.enter_graceful_shutdown()
        # KV readers and process watchers first, so workers going away read as no failure.
        await self._followers.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._launcher is not None:
            await self._launcher.stop()
        for server in self._servers:
            await server.stop(STOP_GRACE_S)
        await self.registry.close()
        if self._metrics_server is not None:
            self._metrics_server.stop()


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for calls to `service` without `authorization: Bearer <token>`."""

    def __init__(self, token: str, service: str):
        self._expected = f"Bearer {token}".encode()
        self._prefix = f"/{service}/"

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._prefix):
            return handler
        supplied = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(supplied).encode(), self._expected):
            return handler
        return _denying_handler(handler)


def _denying_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def deny(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: missing or wrong bearer token")

    make = grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def _auth_token(config: ClusterConfig) -> str | None:
    name = config.coordinator.auth_token_env
    if name is None:
        return None
    token = os.environ.get(name, "")
    if not token:
        raise ClusterConfigError(f"coordinator.auth_token_env: environment variable {name} is not set or empty")
    return token


def _tls_credentials(config: ClusterConfig, config_dir: Path) -> grpc.ServerCredentials | None:
    tls = config.coordinator.tls
    if tls is None:
        return None
    pems = []
    for key, path in (("cert_file", tls.cert_file), ("key_file", tls.key_file)):
        path = path if path.is_absolute() else config_dir / path
        try:
            pems.append(path.read_bytes())
        except OSError as err:
            raise ClusterConfigError(f"coordinator.tls.{key}: cannot read {path}: {err.strerror}") from None
    cert, key = pems
    return grpc.ssl_server_credentials([(key, cert)])


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        port = (server.add_secure_port(address, credentials) if credentials
                else server.add_insecure_port(address))
    except RuntimeError as err:
        raise LaunchError(f"coordinator: cannot listen on {address}: {err}") from None
    if port == 0:
        raise LaunchError(f"coordinator: cannot listen on {address}")
    return port


def _server_options(config: ClusterConfig) -> list[tuple[str, int]]:
    limit = config.coordinator.limits.max_message_bytes
    # so_reuseport off: a second coordinator on a taken port must fail, not share it.
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0)]


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "[::]", "::") else host


async def _start_servers(config: ClusterConfig, config_dir: Path, api: ShardlineServicer,
                         control: CoordinatorServicer, health: health_aio.HealthServicer):
    """(servers, api address, control address); a second, insecure, loopback server
    carries the control plane when TLS is on (local workers speak plain gRPC)."""
    token, credentials = _auth_token(config), _tls_credentials(config, config_dir)
    interceptors = [BearerTokenInterceptor(token, SERVICE_NAME)] if token else []
    server = grpc.aio.server(interceptors=interceptors, options=_server_options(config))
    server.add_generic_rpc_handlers([api.rpc_handler()])
    worker_pb2_grpc.add_CoordinatorServicer_to_server(control, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection([SERVICE_NAME, CONTROL_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name[
        "Health"].full_name, reflection.SERVICE_NAME], server)
    host = config.coordinator.host
    port = _bind(server, f"{host}:{config.coordinator.port}", credentials)
    servers, control_address = [server], f"{_connect_host(host)}:{port}"
    if credentials is not None:
        control_server = grpc.aio.server(options=_server_options(config))
        worker_pb2_grpc.add_CoordinatorServicer_to_server(control, control_server)
        control_address = f"127.0.0.1:{_bind(control_server, '127.0.0.1:0', None)}"
        servers.append(control_server)
    for s in servers:
        await s.start()
    return servers, f"{_connect_host(host)}:{port}", control_address


def _wire_state(config: ClusterConfig, metrics: Metrics) -> tuple[Registry, PrefixIndex, KVEventFollower, Router]:
    specs = config.group_specs()
    registry = Registry(config.coordinator.heartbeat_timeout_s,
                        {s.name: s.engine.block_size_tokens for s in specs})
    index = PrefixIndex()
    followers = KVEventFollower(index, on_broken=registry.mark_unhealthy)
    registry.on_registered.append(lambda g: followers.follow(g.name, g.stub))
    registry.on_unhealthy.append(lambda g: followers.stop(g.name))
    for listeners in (registry.on_status, registry.on_unhealthy, registry.on_registered):
        listeners.append(lambda g: metrics.observe_group(g.name, g.healthy, g.kv_usage,
                                                         g.status.prefix_hit_rate if g.status else 0.0))
    return registry, index, followers, Router(config.coordinator.router, index)


async def start_cluster(config: ClusterConfig, config_path: str | Path, *, launch: bool = True,
                        tokenizer: Tokenizer | None = None) -> Cluster:
    """Serves the coordinator and (with `launch`) starts every group, returning once all registered.

    Without `launch`, groups are expected to register on their own (tests, external workers).
    `tokenizer`: the model's, when the caller has it loaded already.
    Raises ClusterConfigError for settings that cannot work, LaunchError when a group fails to start.
    """
    if launch:
        check_launchable(config)
    metrics = Metrics()
    registry, index, followers, router = _wire_state(config, metrics)
    tokenizer = tokenizer or await asyncio.to_thread(load_tokenizer, config.model)
    preparer = RequestPreparer(config.served_model_name, config.coordinator.limits, tokenizer)
    api = ShardlineServicer(config, registry, router, metrics, preparer)
    group_names = [s.name for s in config.group_specs()]
    control = CoordinatorServicer(registry, config.coordinator.heartbeat_interval_s, frozenset(group_names))
    health = health_aio.HealthServicer()
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    servers, address, control_address = await _start_servers(config, Path(config_path).resolve().parent,
                                                             api, control, health)
    cluster = Cluster(config, address, control_address, registry, index, router, api, metrics, servers, health,
                      followers)
    try:
        cluster._tasks.append(asyncio.ensure_future(registry.monitor(config.coordinator.heartbeat_interval_s / 2)))
        if config.coordinator.metrics_port is not None:
            cluster._metrics_server = serve_metrics(metrics, config.coordinator.host, config.coordinator.metrics_port)
        if launch:
            await _launch(cluster, config_path, group_names)
    except BaseException:
        await cluster.stop()
        raise
    _track_health(cluster)
    return cluster


def _track_health(cluster: Cluster) -> None:
    """Health SERVING while at least one group is healthy, NOT_SERVING otherwise."""
    pending: set[asyncio.Task] = set()

    def update(_group=None) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if cluster.registry.healthy_groups() \
            else health_pb2.HealthCheckResponse.NOT_SERVING
        task = asyncio.ensure_future(cluster._health.set(SERVICE_NAME, status))
        pending.add(task)
        task.add_done_callback(pending.discard)

    cluster.registry.on_registered.append(update)
    cluster.registry.on_unhealthy.append(update)
    update()


async def _launch(cluster: Cluster, config_path: str | Path, group_names: list[str]) -> None:
    launcher = make_launcher(cluster.config, config_path, group_names, cluster.control_address)
    cluster._launcher = launcher
    launcher.start()
    await launcher.wait_ready(cluster.registry, cluster.config.coordinator.startup_timeout_s)
    on_exit = lambda name, reason: cluster.registry.mark_unhealthy(name, reason)
    cluster._tasks.append(asyncio.ensure_future(launcher.watch(on_exit)))


def serve(config_path: str, ready_file: str | None = None, launcher: str | None = None,
          ray_address: str | None = None) -> int:
    """Runs the cluster until SIGINT/SIGTERM. 0 after a clean stop, 2 for a bad config or model,
    1 when a group fails to start. `launcher`, `ray_address`: the command line's overrides."""
    try:
        config = with_overrides(load_cluster_config(config_path), launcher, ray_address)
    except ClusterConfigError as err:
        print(f"shardline: error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s coordinator %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(_serve(config, config_path, ready_file))
    except ClusterConfigError as err:
        print(f"shardline: error: {err}", file=sys.stderr)
        return 2
    except ModelLoadError as err:  # the coordinator reads the model's tokenizer first
        print(f"shardline: error: model: {err}", file=sys.stderr)
        return 2
    except LaunchError as err:
        print(f"shardline: error: {err}", file=sys.stderr)
        return 1


async def _serve(config: ClusterConfig, config_path: str, ready_file: str | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    starting = asyncio.ensure_future(start_cluster(config, config_path))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # a signal while the groups start: start_cluster cleans up as it is cancelled
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        return 0
    stopping.cancel()
    cluster = starting.result()
    try:
        print(f"shardline: serving {config.served_model_name} on {cluster.address} "
              f"({len(cluster.registry.groups())} groups)", file=sys.stderr, flush=True)
        if ready_file:
            _write_atomically(Path(ready_file), cluster.address + "\n")
        await stop.wait()
    finally:
        await cluster.stop()
    return 0


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)
