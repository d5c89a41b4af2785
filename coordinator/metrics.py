"""Prometheus metrics of the coordinator, on a registry of its own (never
prometheus-client's global one, so several clusters in one process, as in
tests, do not collide), optionally served over HTTP on `metrics_port`.

Only records numbers it is handed; it must not read cluster state itself
or decide anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_E2E_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.time_to_first_token_s = Histogram(
            "shardline_time_to_first_token_seconds", "Time from admission to the first token",
            buckets=_LATENCY_BUCKETS_S, registry=r)
        self.inter_token_latency_s = Histogram(
            "shardline_inter_token_latency_seconds", "Time between streamed tokens",
            buckets=_LATENCY_BUCKETS_S, registry=r)
        self.e2e_latency_s = Histogram(
            "shardline_e2e_request_latency_seconds", "Time from admission to the end of the request",
            buckets=_E2E_BUCKETS_S, registry=r)
        self.queue_depth = Gauge("shardline_queue_depth", "Requests admitted and not yet finished", registry=r)
        self.group_kv_usage = Gauge("shardline_group_kv_usage", "Fraction of a group's KV blocks in use",
                                    ["group"], registry=r)
        self.group_prefix_hit_rate = Gauge("shardline_group_prefix_hit_rate",
                                           "Prefix-cache hit rate a group reports", ["group"], registry=r)
        self.group_healthy = Gauge("shardline_group_healthy", "1 when the group is healthy", ["group"], registry=r)
        self.group_in_flight = Gauge("shardline_group_in_flight_requests",
                                     "Requests the coordinator has in flight on a group", ["group"], registry=r)
        self.group_active_blocks = Gauge("shardline_group_active_kv_blocks",
                                         "KV blocks of the requests in flight on a group", ["group"], registry=r)
        self.router_prefix_hit_rate = Gauge("shardline_router_prefix_hit_rate",
                                            "Predicted cached share of routed prompt blocks", registry=r)
        self.requests_by_finish_reason = Counter("shardline_requests_finished", "Finished requests",
                                                 ["finish_reason"], registry=r)
        self.requests_by_status = Counter("shardline_requests_by_status", "Requests by gRPC status code",
                                          ["code"], registry=r)
        self.failovers = Counter("shardline_request_failovers", "Requests resumed on another group", registry=r)
        self.tokens_generated = Counter("shardline_generated_tokens", "Tokens streamed to clients", registry=r)
        self.prefills = Counter("shardline_prefills", "Prompts prefilled on a prefill group (remote) or where "
                                "they decode (local)", ["where"], registry=r)
        self.prefill_fallbacks = Counter("shardline_prefill_fallbacks",
                                         "Remote prefills that failed and ran where the request decodes", registry=r)
        self.kv_transfer_bytes = Counter("shardline_kv_transfer_bytes", "KV bytes pushed from prefill to decode "
                                         "groups, by path (link: a pair link, stream: inside PushKV)", ["path"],
                                         registry=r)
        self.kv_transfer_s = Histogram("shardline_kv_transfer_seconds", "Time one request's KV push added "
                                       "(pieces on the link and the commit)", ["path"],
                                       buckets=_LATENCY_BUCKETS_S, registry=r)

    def observe_group(self, name: str, healthy: bool, kv_usage: float, prefix_hit_rate: float) -> None:
        self.group_healthy.labels(name).set(1.0 if healthy else 0.0)
        self.group_kv_usage.labels(name).set(kv_usage)
        self.group_prefix_hit_rate.labels(name).set(prefix_hit_rate)

    def observe_load(self, name: str, num_in_flight: int, active_blocks: int) -> None:
        self.group_in_flight.labels(name).set(num_in_flight)
        self.group_active_blocks.labels(name).set(active_blocks)


@dataclass
class MetricsServer:
    server: WSGIServer
    thread: Thread

    @property
    def port(self) -> int:
        return self.server.server_port

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5.0)


def serve_metrics(metrics: Metrics, host: str, port: int) -> MetricsServer:
    """Serves /metrics on a daemon thread; port 0 picks a free one."""
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return MetricsServer(server, thread)
