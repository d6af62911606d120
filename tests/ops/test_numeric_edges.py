"""Retrieval probabilities at numeric edges (tiny and huge temperatures, huge similarities)
against a float64 reference written from the definition, with the maximum subtracted first."""

from __future__ import annotations

import numpy as np
import pytest


def reference_retrieval_probs(sims: np.ndarray, labels: np.ndarray, num_classes: int, tau: float) -> np.ndarray:
    """float64, from the definition, with the max subtracted before dividing by tau."""
    out = np.zeros((len(sims), num_classes))
    for i, (s, lab) in enumerate(zip(sims.astype(np.float64), labels, strict=True)):
        real = lab >= 0
        if not real.any():
            continue
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            d = (s[real] - s[real].max()) / np.float64(np.float32(tau)) if np.float32(tau) > 0 else None
        w = np.where(s[real] == s[real].max(), 1.0, 0.0) if d is None else np.where(d == 0, 1.0, np.exp(d))
        np.add.at(out[i], lab[real], w / w.sum())
    return out


@pytest.mark.parametrize("tau", [1e-50, 1e-30, 1e-8, 0.05, 1e30])
@pytest.mark.parametrize("scale", [1.0, 1e30])
def test_retrieval_probs_are_finite_at_numeric_edges(tau: float, scale: float) -> None:
    from knnclip.engine import ops

    rng = np.random.default_rng(5)
    sims = (rng.uniform(-1, 1, size=(40, 7)) * scale).astype(np.float32)
    sims[:, 3] = sims[:, 2]  # ties
    labels = rng.integers(-1, 5, size=(40, 7))
    got = ops.retrieval_probs(sims, labels, 5, tau)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, reference_retrieval_probs(sims, labels, 5, tau), atol=1e-5)


def test_retrieval_probs_refuse_infinite_tau() -> None:
    from knnclip.engine import ops

    with pytest.raises(ValueError, match="tau must be a finite number"):
        ops.retrieval_probs(np.zeros((1, 2), np.float32), np.zeros((1, 2), np.int64), 2, float("inf"))
