"""The skinny GEMM's K-split choice from each split's time alone (cuda_skinny.pick_k_split):
plain Python, but its module needs CuPy; skipped without CuPy or a GPU."""

from __future__ import annotations

import pytest

from gpu_guard import cupy  # noqa: F401, E402  (skips the module without a GPU)

from shardline.kernels.cuda_skinny import pick_k_split  # noqa: E402

pytestmark = pytest.mark.gpu


def test_pick_k_split_takes_the_largest_near_tie_at_one_row():
    """At one row the largest split within the tie of the fastest alone; at more rows, or
    outside the tie, the fastest."""
    seconds = {1: 20.7e-6, 2: 21.4e-6, 4: 20.3e-6}
    assert pick_k_split(seconds, 1, 0.03) == 4 and pick_k_split(seconds, 2, 0.03) == 4
    seconds = {1: 85.0e-6, 2: 83.2e-6, 4: 84.5e-6}   # 4 is 1.6% slower than 2
    assert pick_k_split(seconds, 1, 0.03) == 4
    assert pick_k_split(seconds, 1, 0.01) == 2 and pick_k_split(seconds, 1, 0.0) == 2
    assert pick_k_split(seconds, 4, 0.03) == 2
    assert pick_k_split({1: 354.5e-6, 2: 366.6e-6, 4: 407.4e-6}, 1, 0.03) == 1


def test_pick_k_split_takes_an_absolute_tie_on_short_kernels():
    """At one row, a split within tie_s seconds of the fastest counts as a tie where that is
    more than the fraction: a short kernel's split 4 kept though 15% slower alone, a long one's
    fastest kept past both ties; at two rows the fastest whatever the ties."""
    short = {1: 9.1e-6, 2: 9.6e-6, 4: 10.5e-6}
    assert pick_k_split(short, 1, 0.03, 2e-6) == 4
    assert pick_k_split(short, 1, 0.03, 1e-6) == 2
    assert pick_k_split(short, 1, 0.03) == 1
    assert pick_k_split(short, 2, 0.03, 2e-6) == 1
    assert pick_k_split({1: 354.5e-6, 2: 366.6e-6, 4: 407.4e-6}, 1, 0.03, 2e-6) == 1
    noisy = {1: 30.6e-6, 2: 28.1e-6, 4: 31.1e-6}   # an o projection timed with launch gaps (session 32)
    assert pick_k_split(noisy, 1, 0.03, 4e-6) == 4 and pick_k_split(noisy, 1, 0.03, 2e-6) == 2
    assert pick_k_split({1: 354.5e-6, 2: 366.6e-6, 4: 407.4e-6}, 1, 0.03, 4e-6) == 1
