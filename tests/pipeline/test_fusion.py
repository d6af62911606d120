"""Retrieval fusion at both placements against a float64 reference written from the formulas of
kNN-CLIP (Fig. 4: into FC-CLIP's out-of-vocabulary branch, before the geometric ensemble) and of
the engine's earlier placement (into the ensembled distribution)."""

from __future__ import annotations

import numpy as np
import pytest

from knnclip.engine.config import RetrievalConfig
from knnclip.engine.errors import InvalidInputError
from knnclip.engine.pipeline import postprocess


def softmax64(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def reference_mask_cls(in_logits, ov_logits, seen, alpha, beta, p_ret, T, lam, placement) -> np.ndarray:
    in_logits, ov_logits, p_ret = (np.asarray(a, np.float64) for a in (in_logits, ov_logits, p_ret))
    p_in, p_out = softmax64(in_logits[:, :-1]), softmax64(ov_logits[:, :-1])
    w = np.where(seen, alpha, beta)
    confident = (p_ret.max(axis=1) >= T)[:, None]
    with np.errstate(divide="ignore"):
        if placement == "out_of_vocab":
            p_out = np.where(confident, lam * p_ret + (1 - lam) * p_out, p_out)
            p = softmax64((1 - w) * np.log(p_in) + w * np.log(p_out))
        else:
            p = softmax64((1 - w) * np.log(p_in) + w * np.log(p_out))
            p = np.where(confident, lam * p_ret + (1 - lam) * p, p)
    void = softmax64(in_logits)[:, -1:]
    return np.log(np.concatenate([p * (1 - void), void], axis=1) + 1e-8)


@pytest.mark.parametrize("placement", ["out_of_vocab", "final"])
@pytest.mark.parametrize("seed", range(4))
def test_both_placements_match_the_float64_reference(placement: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    q, c = 30, 9
    in_logits = (rng.normal(size=(q, c + 1)) * 3).astype(np.float32)
    ov_logits = (rng.normal(size=(q, c + 1)) * 3).astype(np.float32)
    seen = rng.random(c) < 0.5
    p_ret = rng.dirichlet(np.full(c, 0.3), size=q).astype(np.float32)
    p_ret[::5] = 0  # rows without neighbours
    T, lam = 0.4, 0.6
    base = postprocess.geometric_ensemble(in_logits, ov_logits, seen, 0.4, 0.8)
    fused = postprocess.fuse_retrieval(base, p_ret, T, lam, placement)
    got = postprocess.ClassProbabilities(fused, base.void).mask_cls()
    ref = reference_mask_cls(in_logits, ov_logits, seen, 0.4, 0.8, p_ret, T, lam, placement)
    np.testing.assert_allclose(np.exp(got), np.exp(ref), atol=2e-6)


def test_the_in_vocabulary_branch_damps_retrieval_only_out_of_vocab() -> None:
    """FC-CLIP sure of class 0 in both branches, retrieval sure of class 1: fused after the
    ensemble, retrieval wins; fused into the out-of-vocabulary branch, the in-vocabulary
    branch keeps class 0."""
    in_logits = np.array([[8.0, -8.0, 0.0]], np.float32)
    ov_logits = np.array([[4.0, -4.0, 0.0]], np.float32)
    p_ret = np.array([[0.0, 1.0]], np.float32)
    base = postprocess.geometric_ensemble(in_logits, ov_logits, np.array([True, True]), 0.4, 0.8)
    final = postprocess.fuse_retrieval(base, p_ret, 0.5, 0.7, "final")
    paper = postprocess.fuse_retrieval(base, p_ret, 0.5, 0.7, "out_of_vocab")
    assert final.argmax() == 1 and paper.argmax() == 0


def test_config_default_is_the_papers_placement_and_refuses_others() -> None:
    assert RetrievalConfig().fusion == "out_of_vocab"
    with pytest.raises(InvalidInputError, match="fusion must be one of"):
        RetrievalConfig(fusion="everywhere")
