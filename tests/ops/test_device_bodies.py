"""The CUDA kernels' per-element bodies (csrc/kernels/bodies.h), compiled for the host in the
kernels' own loops (knnclip._C.device_bodies), against float64 references written from the
definitions: the code the GPU runs, tested where no GPU is."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from knnclip import _C
from knnclip.engine.bench import reference_ops as ref
from tests.support.arrays import band_matrix, random_array

bodies = _C.device_bodies


@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 4),
    hw=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    out_hw=st.tuples(st.integers(1, 30), st.integers(1, 30)),
    kinds=st.tuples(*[st.sampled_from(["bilinear", "dense", "holes"])] * 2),
)
def test_resample_matches_float64(seed, n, hw, out_hw, kinds):
    rng = np.random.default_rng(seed)
    x = random_array(rng, (n, *hw), np.float32, 4.0)
    rows = band_matrix(rng, out_hw[0], hw[0], kinds[0])
    cols = band_matrix(rng, out_hw[1], hw[1], kinds[1])
    got = bodies.resample(x, rows, cols)
    scale = np.abs(rows).sum(1).max() * np.abs(cols).sum(1).max() * 4.0 * 8
    np.testing.assert_allclose(got, ref.resample(x, rows, cols), rtol=1e-5, atol=1e-6 * scale)


def test_resample_at_fcclips_size_matches_the_cpu_kernel():
    from knnclip.engine.pipeline.postprocess import resize_matrices

    rng = np.random.default_rng(3)
    masks = random_array(rng, (4, 160, 216), np.float32, 8.0)
    rows, cols = resize_matrices((160, 216), (640, 864), (640, 853), (512, 683))
    got = bodies.resample(masks, rows, cols)
    np.testing.assert_allclose(got, ref.resample(masks, rows, cols), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, _C.resample(masks, rows, cols), rtol=1e-5, atol=1e-5)


@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 20),
    c=st.integers(1, 30),
    hw=st.tuples(st.integers(1, 20), st.integers(1, 30)),
    ties=st.booleans(),
)
def test_semantic_argmax_matches_float64_and_keeps_the_first_of_equals(seed, n, c, hw, ties):
    rng = np.random.default_rng(seed)
    probs = rng.random((n, c)).astype(np.float32)
    if ties:  # duplicated class columns: equal scores, the first must win
        probs[:, c // 2 :] = probs[:, : c - c // 2]
    logits = random_array(rng, (n, *hw), np.float32, 5.0)
    got = bodies.semantic_argmax(probs, logits)
    assert got.dtype == np.int32 and got.shape == hw
    scores = ref.semantic_merge(probs.astype(np.float64), logits.astype(np.float64))
    top2 = np.sort(scores, axis=0)[-2:] if c > 1 else np.stack([np.full(hw, -1.0), scores[0]])
    clear = top2[1] - top2[0] > 1e-4 * np.abs(top2[1])
    np.testing.assert_array_equal(got[clear], scores.argmax(0)[clear])
    # an exact copy of an earlier column sums to the same float32 there: the earlier one wins
    first_copy = np.array([next(j for j in range(c) if np.array_equal(probs[:, j], probs[:, i])) for i in range(c)])
    np.testing.assert_array_equal(first_copy[got], got)


@given(
    seed=st.integers(0, 2**32 - 1),
    q=st.integers(1, 20),
    hw=st.tuples(st.integers(1, 30), st.integers(1, 40)),
    scale=st.sampled_from([1.0, 10.0, 120.0]),
)
def test_panoptic_owner_matches_float64(seed, q, hw, scale):
    rng = np.random.default_rng(seed)
    masks = random_array(rng, (q, *hw), np.float32, scale)
    queries = rng.choice(q, int(rng.integers(1, q + 1)), replace=False).astype(np.int64)
    scores = rng.random(len(queries)).astype(np.float32)
    owner, own, pixels = bodies.panoptic_owner(scores, masks, queries)
    values = ref.panoptic_scores(scores, masks, queries)
    top2 = np.sort(values, 0)[-2:] if len(queries) > 1 else np.stack([np.full(hw, -1.0), values.max(0)])
    clear = top2[1] - top2[0] > 1e-5 * top2[1]
    np.testing.assert_array_equal(owner[clear], values.argmax(0)[clear])
    kept = masks[queries]
    np.testing.assert_array_equal(own, np.take_along_axis(kept, owner[None].astype(np.int64), 0)[0] >= 0)
    np.testing.assert_array_equal(pixels, (kept >= 0).reshape(len(queries), -1).sum(1))
    # and the CPU kernel decides every clear pixel the same way
    cpu_owner, _, cpu_pixels = _C.panoptic_owner(scores, masks, queries)
    np.testing.assert_array_equal(owner[clear], cpu_owner[clear])
    np.testing.assert_array_equal(pixels, cpu_pixels)


def test_panoptic_ties_and_saturation_go_to_the_first_query():
    masks = np.array([[[-200.0, 30.0, 0.0]], [[-300.0, 40.0, 0.0]]], np.float32)  # sigmoid 0, 1, 0.5
    owner, own, pixels = bodies.panoptic_owner(np.array([0.5, 0.5], np.float32), masks, np.array([0, 1]))
    assert owner.tolist() == [[0, 0, 0]] and own.tolist() == [[False, True, True]] and pixels.tolist() == [2, 2]


@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(0, 20), c=st.integers(1, 30))
def test_fuse_matches_float64(seed, rows, c):
    rng = np.random.default_rng(seed)
    base, ret = rng.random((rows, c)).astype(np.float32), rng.random((rows, c)).astype(np.float32)
    threshold, lam = float(rng.random()), float(rng.random())
    got = bodies.fuse(base, ret, threshold, lam)
    np.testing.assert_allclose(got, ref.fuse(base, ret, threshold, lam), rtol=1e-6, atol=1e-7)


@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 4),
    mhw=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    hw=st.tuples(st.integers(1, 40), st.integers(1, 40)),
)
def test_binarize_picks_the_pixels_torchs_bilinear_resize_does(seed, n, mhw, hw):
    rng = np.random.default_rng(seed)
    masks = random_array(rng, (n, *mhw), np.float32, 3.0)
    got = bodies.binarize(masks, *hw, threshold=0.0)
    want = ref.resize_bilinear(masks.astype(np.float64), *hw)
    clear = np.abs(want) > 1e-5
    np.testing.assert_array_equal(got[clear], (want > 0)[clear])


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="float32"):
        bodies.resample(np.zeros((1, 2, 2), np.float64), np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32))
    with pytest.raises(ValueError, match="queries must index"):
        bodies.panoptic_owner(np.ones(1, np.float32), np.zeros((2, 3, 3), np.float32), np.array([2]))


@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(0, 30),
    k=st.integers(1, 12),
    c=st.integers(1, 20),
    tau=st.sampled_from([1e-3, 0.07, 1.0]),
)
def test_retrieval_probs_matches_float64(seed, rows, k, c, tau):
    rng = np.random.default_rng(seed)
    sims = rng.uniform(-1, 1, (rows, k)).astype(np.float32)
    labels = rng.integers(-1, c, (rows, k)).astype(np.int64)
    got = bodies.retrieval_probs(sims, labels, c, tau)
    np.testing.assert_allclose(got, ref.retrieval_probs(sims.astype(np.float64), labels, c, tau), atol=1e-6)


def test_retrieval_probs_refuses_bad_neighbours():
    sims = np.array([[0.5, np.nan]], np.float32)
    with pytest.raises(ValueError, match="NaN"):
        bodies.retrieval_probs(sims, np.array([[0, 1]]), 2, 0.1)
    with pytest.raises(ValueError, match="labels must be"):
        bodies.retrieval_probs(np.zeros((1, 2), np.float32), np.array([[0, 5]]), 2, 0.1)
    # a NaN where there is no neighbour is never read
    np.testing.assert_allclose(bodies.retrieval_probs(sims, np.array([[1, -1]]), 2, 0.1), [[0.0, 1.0]])
