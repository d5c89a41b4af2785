"""Counter-based random numbers shared by the NumPy and CUDA samplers.

A draw depends only on (seed, offset, index), never on batch position or
call order, so seeded sampling is reproducible across batch compositions
and the CUDA kernel (which implements the same SplitMix64 steps in C) gives
the same noise bit for bit. The constants are SplitMix64's.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def splitmix64(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def uniform(seed: int, offset: int, count: int) -> np.ndarray:
    """count float32 values in (0, 1): ((bits >> 41) + 0.5) / 2**23. With 23
    bits the sum and the product are exact in float32, so 1.0 (E = 0) never comes."""
    with np.errstate(over="ignore"):
        base = splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + np.uint64(offset) * _GOLDEN)
        bits = splitmix64(base + np.arange(count, dtype=np.uint64))
    return (((bits >> np.uint64(41)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-23)).astype(np.float32)


def exponential(seed: int, offset: int, count: int) -> np.ndarray:
    """Exp(1) draws as float32: -log(u)."""
    return -np.log(uniform(seed, offset, count))
