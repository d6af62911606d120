"""Random arrays for the ops' tests: values at a scale, and band-shaped resampling matrices."""

from __future__ import annotations

import numpy as np


def random_array(rng: np.random.Generator, shape, dtype, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(dtype)


def band_matrix(rng: np.random.Generator, rows: int, cols: int, kind: str) -> np.ndarray:
    """A [rows, cols] float32 matrix: 'bilinear' (two taps per row, as a resize), 'dense', or
    'holes' (bands with zero rows in between)."""
    if kind == "dense":
        return rng.standard_normal((rows, cols)).astype(np.float32)
    m = np.zeros((rows, cols), np.float32)
    for r in range(rows):
        if kind == "holes" and rng.random() < 0.3:
            continue
        lo = int(rng.integers(cols))
        hi = min(cols, lo + int(rng.integers(1, 4)))
        m[r, lo:hi] = rng.random(hi - lo)
    return m
