"""bench/step_profile.py's TTFT split (gpu_timeline), on made-up GPU activities: busy time,
idle gaps and the time outside the span against a microsecond raster of the same intervals."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from step_profile import gpu_timeline, per_step_kernels  # noqa: E402


def test_timeline_against_a_raster():
    seed = int(np.random.SeedSequence().entropy % 2**63)
    print(f"random seed {seed}")
    rng = np.random.default_rng(seed)
    for _ in range(20):
        n = int(rng.integers(1, 40))
        starts = np.sort(rng.integers(100, 5000, n))
        lengths = rng.integers(1, 300, n)   # some overlap the next (dependent launches), some leave gaps
        intervals = [(float(s), float(s + d), f"k{i}") for i, (s, d) in enumerate(zip(starts, lengths))]
        order = rng.permutation(n)           # the profiler's order is not the start order
        wall = float((starts + lengths).max()) + float(rng.integers(0, 500))
        got = gpu_timeline([intervals[i] for i in order], wall)
        covered = np.zeros(int(wall) + 1, bool)
        for start, end, _ in intervals:
            covered[int(start):int(end)] = True
        first, last = int(starts.min()), int((starts + lengths).max())
        assert got["gpu_busy_ms"] * 1e3 == pytest.approx(covered.sum())
        assert got["gpu_span_ms"] * 1e3 == pytest.approx(last - first)
        assert got["idle_in_span_ms"] * 1e3 == pytest.approx((last - first) - covered.sum())
        assert got["outside_span_ms"] * 1e3 == pytest.approx(wall - (last - first))
        assert got["activity_sum_ms"] * 1e3 == pytest.approx(lengths.sum())
        # each gap: an idle run of the raster, ended by the activity that starts there
        idle = ~covered[first:last]
        edges = np.flatnonzero(np.diff(np.concatenate([[0], idle.astype(int), [0]])))
        runs = sorted((int(b - a) for a, b in zip(edges[::2], edges[1::2])), reverse=True)
        assert [gap["us"] for gap in got["longest_gaps"]] == pytest.approx(runs[:8])
        for gap in got["longest_gaps"]:
            start = next(s for s, _, name in intervals if name == gap["before"])
            assert not covered[int(start - gap["us"]):int(start)].any() and covered[int(start) - int(gap["us"]) - 1]


def test_timeline_without_activity_is_refused():
    with pytest.raises(ValueError, match="no GPU activity"):
        gpu_timeline([], 100.0)


def test_per_step_kernels_split_the_span_by_name():
    """Two steps of made-up activities (a copy, a gap, two overlapping kernels): each name's calls
    and time a step, and shares of the critical path (the gap counted to the kernel after it)
    that add up to the span a step."""
    step = [(0.0, 2.0, "Memcpy HtoD (Pinned -> Device)"), (5.0, 15.0, "gemm_kernel<1, 4>(float const*)"),
            (12.0, 20.0, "norm_kernel(float*)")]
    intervals = step + [(start + 20.0, end + 20.0, name) for start, end, name in step]
    rows = {row["kernel"]: row for row in per_step_kernels(intervals, 2)}
    assert rows["gemm_kernel<1, 4>"] == {"kernel": "gemm_kernel<1, 4>", "calls": 1.0, "us": 10.0, "adds_us": 13.0}
    assert rows["norm_kernel"]["us"] == 8.0 and rows["norm_kernel"]["adds_us"] == 5.0   # 15 -> 20
    assert rows["Memcpy HtoD "]["adds_us"] == 2.0
    span = gpu_timeline(intervals, 50.0)["gpu_span_ms"] * 1e3 / 2
    assert sum(row["adds_us"] for row in rows.values()) == pytest.approx(span)
