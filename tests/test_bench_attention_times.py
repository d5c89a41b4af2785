"""bench/attention_times.py's case list: what it accepts, and a clear error naming the bad value."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from attention_times import parse_cases  # noqa: E402


def test_cases_parse():
    assert parse_cases("decode:64x512,prefill:2048,decode:1x16,prefill:64x128") == [
        ("decode", 64, 512), ("prefill", 1, 2048), ("decode", 1, 16), ("prefill", 64, 128)]


@pytest.mark.parametrize("bad", ["decode:64", "decode:0x512", "prefill:100", "prefill:2x3x16", "prefill:0x16",
                                 "prefil:2048", "decode:axb", ""])
def test_bad_cases_are_named(bad):
    with pytest.raises(ValueError, match="--cases") as err:
        parse_cases(f"decode:16x512,{bad}")
    assert repr(bad) in str(err.value)
