"""bench/flash_decode_trace.py without a GPU: its cases, and the summary of a launch's trace
(rows as flash_decode.cu's FLASH_DECODE_TRACE writes them) against times worked out by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from flash_decode_trace import PHASES, SLOTS, parse_cases, summarize  # noqa: E402


def test_cases_parse_and_bad_ones_name_the_option():
    assert parse_cases("1x512,64x2048") == [(1, 512), (64, 2048)]
    for bad in ("1x500", "0x512", "64", "ax16"):
        with pytest.raises(ValueError, match="--cases"):
            parse_cases(bad)


def block(clocks, start_ns, end_ns, kind, sm):
    row = np.zeros(SLOTS, dtype=np.uint64)
    row[:len(clocks)] = clocks
    row[8], row[9], row[10], row[11] = start_ns, end_ns, kind, sm
    return row


def test_summary_times_each_phase_of_the_blocks_with_a_tile():
    ghz = 2e9   # 2 cycles a ns: 2000 cycles are 1 us
    base = 10 ** 12
    rows = np.stack([
        # tile blocks: a start clock, then each phase's cycles (lookup, range and first loads, wait,
        # key loop, key-warp merge, split merge)
        block(np.cumsum([50, 100, 2000, 1000, 4000, 400, 0]), base + 1000, base + 9000, 1, 0),
        block(np.cumsum([50, 100, 4000, 1000, 2000, 400, 2000]), base + 3000, base + 12000, 1, 1),
        block(np.cumsum([50, 100, 6000, 1000, 6000, 400, 0]), base + 2000, base + 10000, 1, 1),
        block([5, 7], base, base + 500, 0, 2),                      # past the last tile: first to start
        block([5, 7], base + 600, base + 700, 2, 3),                # a split without keys
        np.zeros(SLOTS, dtype=np.uint64),                           # never ran
    ])
    got = summarize(rows, ghz)
    assert got["blocks"] == {"past the last tile": 1, "tile": 3, "split without keys": 1}
    assert got["sms"] == 4 and got["span_us"] == 12.0
    assert got["tile_starts_us"] == [2.0, 3.0] and got["tile_ends_us"] == [9.0, 10.0, 12.0]
    assert list(got["phases_us"]) == list(PHASES)
    assert got["phases_us"]["tile lookup"] == [0.05, 0.05, 0.05]
    assert got["phases_us"]["range and first loads"] == [2.0, pytest.approx(2.8), 3.0]   # 1, 2, 3 us
    assert got["phases_us"]["key-warp merge"] == [0.2, 0.2, 0.2]
    assert got["phases_us"]["wait"] == [0.5, 0.5, 0.5]
    assert got["phases_us"]["key loop"] == [2.0, pytest.approx(2.8), 3.0]   # 2, 1, 3 us
    assert got["phases_us"]["split merge"] == [0.0, pytest.approx(0.8), 1.0]


def test_a_trace_without_blocks_is_refused():
    with pytest.raises(ValueError, match="no block"):
        summarize(np.zeros((4, SLOTS), dtype=np.uint64), 1e9)
