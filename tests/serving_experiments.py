"""The multi-step experiments of tests/test_serving.py, as coroutines on the
cluster's event loop; each returns a report dict the test asserts on (and
prints, so a run shows the measured numbers)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter

import grpc

from serving_fixtures import AUTH, PASSAGE, PromptCase, Served, collect, sampling, share
from shardline.proto import shardline_pb2 as pb

TOPICS = ["Storms", "Fishing", "The keeper's dog", "Winter"]
BURST_SIZE = 12
PREFIX = " ".join(PASSAGE.split()[:75])  # ~90 tokens: 5 full blocks, then the question


async def _group_of_first(stub, case: PromptCase) -> str:
    responses, code, details = await collect(stub, case.request())
    assert code == grpc.StatusCode.OK, details
    return responses[0].group


def _hit_rate(before: tuple[int, int], after: tuple[int, int]) -> float:
    routed, cached = after[0] - before[0], after[1] - before[1]
    return round(cached / routed, 3) if routed else 0.0


async def routing_experiment(served: Served) -> dict:
    """Four long prefixes (~6 blocks) seeded concurrently (so load spreads them), then follow-ups
    one at a time (they should all go home), then a burst on one hot prefix (load should spread it)."""
    stub = served.stub()
    prefixes = [f"Chapter {i}: {topic}. {PREFIX}" for i, topic in enumerate(TOPICS)]
    homes = await asyncio.gather(*(_group_of_first(stub, sampling(p + " Question 0:", 1)) for p in prefixes))
    await asyncio.sleep(0.5)  # the groups' KV events reach the prefix index
    before = served.router_counters()
    home_hits = 0
    for prefix, home in zip(prefixes, homes):
        for q in (1, 2):
            home_hits += await _group_of_first(stub, sampling(f"{prefix} Question {q}: what next?", 1)) == home
    sequential = served.router_counters()
    burst = [sampling(f"{prefixes[0]} Reader {i} asks: why?", 1) for i in range(BURST_SIZE)]
    burst_groups = await asyncio.gather(*(_group_of_first(stub, c) for c in burst))
    stats = await served.stats()
    return {
        "homes": dict(Counter(homes)),
        "sequential_home_share": home_hits / (2 * len(prefixes)),
        "sequential_router_hit_rate": _hit_rate(before, sequential),
        "burst_size": BURST_SIZE,
        "burst_split": dict(Counter(burst_groups)),
        "burst_home_share": share(Counter(burst_groups), BURST_SIZE).get(homes[0], 0.0),
        "burst_router_hit_rate": _hit_rate(sequential, served.router_counters()),
        "worker_prefix_hit_rate": {g.name: round(g.prefix_hit_rate, 3) for g in stats.groups},
    }


async def _read_rest(call) -> list:
    rest = []
    while (response := await call.read()) is not grpc.aio.EOF:
        rest.append(response)
    return rest


def _idle(g: pb.GroupStats) -> bool:
    return g.num_free_kv_blocks == g.num_kv_blocks and g.num_running == 0


async def cancel_experiment(served: Served) -> dict:
    """A long stream cancelled by its client, another aborted by id: the group's blocks come back."""
    stub = served.stub()
    story = sampling("Tell me a very long story about the sea.", 400, ignore_eos=True)
    call = stub.Generate(story.request(), metadata=AUTH)
    group = (await call.read()).group
    streaming = await served.poll_group(group, lambda g: g.num_free_kv_blocks < g.num_kv_blocks)
    call.cancel()
    after_cancel = await served.poll_group(group, _idle)
    call = stub.Generate(sampling("Tell me another long story.", 400, ignore_eos=True,
                                  request_id="abort-me").request(), metadata=AUTH)
    aborted_group = (await call.read()).group
    found = (await stub.Abort(pb.AbortRequest(request_id="abort-me"), metadata=AUTH)).found
    rest = await _read_rest(call)
    after_abort = await served.poll_group(aborted_group, _idle)
    _, after, _ = await collect(stub, sampling("Hello there", 3).request())
    return {"held_while_streaming": streaming.num_kv_blocks - streaming.num_free_kv_blocks,
            "num_kv_blocks": after_cancel.num_kv_blocks, "free_after_cancel": after_cancel.num_free_kv_blocks,
            "abort_found": found, "abort_finish_reason": rest[-1].finish_reason if rest else None,
            "idle_after_abort": _idle(after_abort), "after": after}


async def kill_experiment(served: Served, cases: list[PromptCase]) -> dict:
    """16 streams; once most have started, SIGKILL the replica serving the most of them."""
    stub = served.stub()
    first_groups: dict[int, str] = {}
    seen_groups: dict[int, list[str]] = {}
    killed_at: list[float] = []
    resumed_after_s: list[float] = []  # per resumed stream: the kill to its first token from the new group

    async def stream(i: int, case: PromptCase):
        responses, code, details = [], grpc.StatusCode.OK, ""
        try:
            async for response in stub.Generate(case.request(), metadata=AUTH):
                responses.append(response)
                if response.group:
                    first_groups.setdefault(i, response.group)
                    seen_groups.setdefault(i, []).append(response.group)
                    if killed_at and len(seen_groups[i]) == 2:
                        resumed_after_s.append(time.monotonic() - killed_at[0])
        except grpc.aio.AioRpcError as err:
            code, details = err.code(), err.details()
        ended_s = time.monotonic() - killed_at[0] if killed_at else 0.0
        return (responses, code, details), ended_s

    tasks = [asyncio.ensure_future(stream(i, c)) for i, c in enumerate(cases)]
    deadline_s = time.monotonic() + 60
    while len(first_groups) < 3 * len(cases) // 4 and time.monotonic() < deadline_s:
        await asyncio.sleep(0.02)
    running = Counter(g for i, g in first_groups.items() if not tasks[i].done())
    victim = (running or Counter(first_groups.values())).most_common(1)[0][0]
    in_flight = running[victim]
    os.kill(served.cluster.launcher.processes[victim].process.pid, signal.SIGKILL)
    killed_at.append(time.monotonic())
    results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    _, after, _ = await collect(stub, sampling("Is anyone still there?", 3).request())
    resumed = sum(1 for groups in seen_groups.values() if len(set(groups)) > 1)
    unavailable = sum(1 for (_, code, _), _ in results if code == grpc.StatusCode.UNAVAILABLE)
    last_end_s = max(ended for _, ended in results)
    return {"results": results, "num_resumed": resumed, "after": after,
            "summary": f"killed {victim} with {in_flight} of {len(cases)} streams in flight on it; "
                       f"{resumed} resumed on the other replica (first resumed token "
                       f"{min(resumed_after_s, default=0):.2f}-{max(resumed_after_s, default=0):.2f} s after the "
                       f"kill), {unavailable} UNAVAILABLE; the last stream ended {last_end_s:.2f} s after the kill"}
