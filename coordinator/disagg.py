"""Conditional disaggregation: whether a request's prompt is prefilled on a
prefill group, and which one; then that group's Prefill call.

A prompt goes to a prefill group when the part its decode group does not
cache (the router's prediction) is at least `min_remote_prefill_tokens`
and some healthy prefill group has fewer than `max_prefill_in_flight`
prefills in flight; among those the router's KV-aware policy picks one.
Everything else is prefilled where it decodes. The decode group reserves
blocks first (the relay's Generate with remote_prefill); the prefill group
pushes the KV straight to it, over the pair's link where it has one
(kv_links.py), and returns the first token's statistics.

Must not stream to clients or decide failover: a failed prefill leaves as
`RemotePrefillFailed` and the relay falls back to local prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from shardline.coordinator.cluster_config import DisaggregationConfig
from shardline.coordinator.kv_links import KVLinkBroker
from shardline.coordinator.metrics import Metrics
from shardline.coordinator.registry import GroupState, Registry
from shardline.coordinator.router import Candidate, Route, Router
from shardline.proto import shardline_pb2 as pb
from shardline.proto import worker_pb2


class RemotePrefillFailed(Exception):
    """The prefill group could not deliver the KV; prefill where the request decodes."""


@dataclass
class HandoffStats:
    remote_prefills: int = 0
    local_prefills: int = 0
    fallbacks: int = 0
    kv_transfer_bytes: int = 0
    kv_transfer_s: float = 0.0
    kv_link_transfers: int = 0

    def to_proto(self, kv_links_opened: int) -> pb.DisaggregationStats:
        return pb.DisaggregationStats(remote_prefills=self.remote_prefills, local_prefills=self.local_prefills,
                                      fallbacks=self.fallbacks, kv_transfer_bytes=self.kv_transfer_bytes,
                                      kv_transfer_s=self.kv_transfer_s, kv_link_transfers=self.kv_link_transfers,
                                      kv_links_opened=kv_links_opened)


class Disaggregator:
    def __init__(self, config: DisaggregationConfig, registry: Registry, router: Router, metrics: Metrics):
        self.config, self._registry, self._router, self._metrics = config, registry, router, metrics
        self.stats = HandoffStats()
        self.links = KVLinkBroker(config.transport, registry)

    def prefill_group_for(self, prompt_token_ids: list[int], decode: GroupState, route: Route) -> GroupState | None:
        """The prefill group for a new request routed to `decode`, or None: prefill there."""
        uncached_tokens = len(prompt_token_ids) - route.cached_blocks * decode.block_size_tokens
        if uncached_tokens < self.config.min_remote_prefill_tokens:
            return None
        candidates = [Candidate(g.name, g.healthy, g.kv_usage, g.num_in_flight, g.active_blocks, g.block_size_tokens)
                      for g in self._registry.groups()
                      if g.role == "prefill" and g.stub is not None and g.healthy
                      and g.num_in_flight < self.config.max_prefill_in_flight]
        choice = self._router.choose(candidates, prompt_token_ids, record=False) if candidates else None
        return None if choice is None else self._registry.get(choice.group)

    def _fallback(self, reason: str) -> RemotePrefillFailed:
        self.stats.fallbacks += 1
        self._metrics.prefill_fallbacks.inc()
        return RemotePrefillFailed(reason)

    def count_local(self) -> None:
        self.stats.local_prefills += 1
        self._metrics.prefills.labels("local").inc()

    async def prefill(self, group: GroupState, decode: GroupState, request_id: str, prompt_token_ids: list[int],
                      sampling: pb.SamplingOptions, num_skip_tokens: int) -> worker_pb2.PrefillResponse:
        """Runs the Prefill call; RemotePrefillFailed (the group marked unhealthy if it is gone)."""
        blocks = -(-len(prompt_token_ids) // group.block_size_tokens)
        self._registry.add_request(group.name, request_id, blocks)
        link_id = ""
        try:
            link_id = await self.links.link_for(group, decode)
            response = await group.stub.Prefill(worker_pb2.PrefillRequest(
                request_id=request_id, prompt_token_ids=prompt_token_ids, sampling=sampling,
                decode_address=decode.address, decode_request_id=request_id, num_skip_tokens=num_skip_tokens,
                kv_link_id=link_id), timeout=self.config.prefill_timeout_s)
        except grpc.aio.AioRpcError as err:
            # UNAVAILABLE is the prefill group itself (down, or its engine stopped); a decode
            # group that failed the push answers FAILED_PRECONDITION and leaves it healthy;
            # ABORTED: the pair's link broke (the prefill leader closed its end).
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                self._registry.mark_unhealthy(group.name, f"Prefill: {err.details()}")
            if err.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED) and link_id:
                self.links.drop(link_id)   # broken, or maybe stuck: a fresh one next time
            raise self._fallback(f"group {group.name}: {err.code().name}: {err.details()}") from None
        except Exception as err:   # e.g. a channel that closed under us
            raise self._fallback(f"group {group.name}: {type(err).__name__}: {err}") from None
        finally:
            self._registry.remove_request(group.name, request_id)
        self.stats.remote_prefills += 1
        self.stats.kv_link_transfers += bool(link_id)
        self.stats.kv_transfer_bytes += response.num_kv_bytes
        self.stats.kv_transfer_s += response.transfer_s
        self._metrics.prefills.labels("remote").inc()
        path = "link" if link_id else "stream"
        self._metrics.kv_transfer_bytes.labels(path).inc(response.num_kv_bytes)
        self._metrics.kv_transfer_s.labels(path).observe(response.transfer_s)
        return response
