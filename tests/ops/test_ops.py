"""knnclip._C against the NumPy float64 references, on every compiled CPU instruction set and,
where one is usable, on the GPU."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from knnclip import _C
from knnclip.engine import __version__
from knnclip.engine.bench import reference_ops as ref
from tests.support.arrays import band_matrix, random_array

FLOAT_DTYPES = st.sampled_from([np.float32, np.float16])


def threshold_margin(mask_logits: np.ndarray, height: int, width: int, threshold: float) -> float:
    """Distance of the resized logits from the threshold: float32 vs float64 rounding may flip a
    pixel closer than this, which is not a bug, so such draws are skipped."""
    masks = mask_logits.reshape(-1, *mask_logits.shape[-2:])
    if masks.shape[0] == 0:
        return np.inf
    return float(np.abs(ref.resize_bilinear(masks, height, width) - threshold).min())


class TestMaskPool:
    """Catches wrong resize indices/weights, binarisation, channel chunk tails and averaging."""

    @given(
        seed=st.integers(0, 2**32 - 1),
        c=st.integers(1, 300),
        hw=st.tuples(st.integers(1, 24), st.integers(1, 24)),
        n=st.integers(0, 12),
        mhw=st.tuples(st.integers(1, 40), st.integers(1, 40)),
        batch=st.sampled_from([None, 1, 3]),
        fdtype=FLOAT_DTYPES,
        mdtype=FLOAT_DTYPES,
        threshold=st.sampled_from([0.0, 0.5, -1.0]),
    )
    def test_matches_reference(self, cpu_isa, device, seed, c, hw, n, mhw, batch, fdtype, mdtype, threshold):
        rng = np.random.default_rng(seed)
        lead = () if batch is None else (batch,)
        features = random_array(rng, (*lead, c, *hw), fdtype, 3.0)
        masks = random_array(rng, (*lead, n, *mhw), mdtype, 2.0)
        assume(threshold_margin(masks.astype(np.float64), *hw, threshold) > 1e-4)
        got = device.get(_C.mask_pool(device.put(features), device.put(masks), threshold))
        want = ref.mask_pool(features.astype(np.float64), masks.astype(np.float64), threshold)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=3e-5 * 3.0)

    def test_real_dinov2_size(self, cpu_isa, device):
        rng = np.random.default_rng(7)
        features = random_array(rng, (1536, 37, 37), np.float32)
        masks = random_array(rng, (250, 200, 272), np.float32, 4.0)
        got = device.get(_C.mask_pool(device.put(features), device.put(masks)))
        np.testing.assert_allclose(got, ref.mask_pool(features, masks), rtol=1e-5, atol=1e-5)

    def test_empty_and_all_negative_masks_give_zeros(self, cpu_isa, device):
        features = np.full((5, 4, 4), 7.0, np.float32)
        masks = np.stack([np.full((8, 8), -3.0), np.full((8, 8), 0.0), np.full((8, 8), 2.0)]).astype(np.float32)
        got = device.get(_C.mask_pool(device.put(features), device.put(masks)))
        assert not np.isnan(got).any()
        np.testing.assert_array_equal(got[0], 0.0)  # all negative
        np.testing.assert_array_equal(got[1], 0.0)  # logit 0 is not > 0
        np.testing.assert_array_equal(got[2], 7.0)

    def test_known_answer_without_resize(self, cpu_isa, device):
        features = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)
        masks = np.array([[[1, -1, 1], [-1, -1, -1]]], np.float32)  # pixels 0 and 2
        got = device.get(_C.mask_pool(device.put(features), device.put(masks)))
        np.testing.assert_array_equal(got, [[(0 + 2) / 2, (6 + 8) / 2]])

    def test_zero_masks_and_zero_channels(self, device):
        def pool(features_shape, masks_shape):
            features, masks = np.ones(features_shape, np.float32), np.ones(masks_shape, np.float32)
            return device.get(_C.mask_pool(device.put(features), device.put(masks)))

        out = pool((3, 4, 4), (0, 2, 2))
        assert out.shape == (0, 3)
        out = pool((0, 4, 4), (2, 2, 2))
        assert out.shape == (2, 0)

    def test_large_n(self, cpu_isa):
        rng = np.random.default_rng(3)
        features = random_array(rng, (64, 9, 9), np.float32)
        masks = random_array(rng, (5000, 9, 9), np.float32)
        np.testing.assert_allclose(_C.mask_pool(features, masks), ref.mask_pool(features, masks), rtol=1e-5, atol=1e-5)

    def test_non_contiguous_input(self):
        rng = np.random.default_rng(4)
        features = random_array(rng, (6, 6, 8), np.float32).transpose(2, 0, 1)  # [8, 6, 6] view
        masks = random_array(rng, (3, 6, 6), np.float32)
        np.testing.assert_allclose(_C.mask_pool(features, masks), ref.mask_pool(features, masks), rtol=1e-5, atol=1e-6)


class TestRetrievalProbs:
    """Catches a softmax over the wrong set, missing-neighbour handling and class scatter."""

    @given(
        seed=st.integers(0, 2**32 - 1),
        n=st.integers(0, 60),
        k=st.integers(1, 20),
        c=st.integers(1, 40),
        tau=st.floats(0.01, 2.0),
        missing=st.floats(0.0, 1.0),
        dtype=FLOAT_DTYPES,
    )
    def test_matches_reference(self, device, seed, n, k, c, tau, missing, dtype):
        rng = np.random.default_rng(seed)
        sims = rng.uniform(-1, 1, (n, k)).astype(dtype)
        labels = rng.integers(0, c, (n, k)).astype(np.int64)
        labels[rng.random((n, k)) < missing] = -1
        sims[labels == -1] = -3.4e38 if dtype == np.float32 else -np.inf  # what FAISS fills in
        got = device.get(_C.retrieval_probs(device.put(sims), device.put(labels), c, tau))
        want = ref.retrieval_probs(sims.astype(np.float64), labels, c, tau)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        has_neighbour = (labels >= 0).any(axis=1)
        np.testing.assert_allclose(got.sum(axis=1)[has_neighbour], 1.0, rtol=1e-5)
        np.testing.assert_array_equal(got[~has_neighbour], 0.0)

    def test_known_answer(self, device):
        sims = np.array([[0.5, 0.5, 0.2], [0.1, 0.2, 0.3]], np.float32)
        labels = np.array([[1, 1, -1], [-1, -1, -1]], np.int64)
        got = device.get(_C.retrieval_probs(device.put(sims), device.put(labels), 3, 0.1))
        np.testing.assert_allclose(got, [[0, 1, 0], [0, 0, 0]], atol=1e-7)

    def test_nan_similarity_of_missing_neighbour_is_ignored(self, device):
        sims = np.array([[0.5, np.nan]], np.float32)
        labels = np.array([[0, -1]], np.int64)
        got = device.get(_C.retrieval_probs(device.put(sims), device.put(labels), 2, 0.1))
        np.testing.assert_allclose(got, [[1, 0]])


class TestFuse:
    """Catches a wrong confidence test (>= T), blend weights or row selection."""

    @given(
        seed=st.integers(0, 2**32 - 1),
        n=st.integers(0, 50),
        c=st.integers(0, 900),
        T=st.floats(0.0, 1.0),
        lam=st.floats(0.0, 1.0),
        dtypes=st.tuples(FLOAT_DTYPES, FLOAT_DTYPES),
    )
    def test_matches_reference(self, device, seed, n, c, T, lam, dtypes):
        rng = np.random.default_rng(seed)
        p_base = rng.dirichlet(np.ones(max(c, 1)), n)[:, :c].astype(dtypes[0])
        p_ret = (rng.dirichlet(np.ones(max(c, 1)) * 0.1, n)[:, :c]).astype(dtypes[1])
        got = device.get(_C.fuse(device.put(p_base), device.put(p_ret), T, lam))
        want = ref.fuse(p_base.astype(np.float64), p_ret.astype(np.float64), T, lam)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)

    def test_threshold_is_inclusive(self, device):
        p_base = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
        p_ret = np.array([[0.25, 0.75], [0.5, 0.5]], np.float32)
        got = device.get(_C.fuse(device.put(p_base), device.put(p_ret), 0.75, 0.5))
        np.testing.assert_allclose(got, [[0.625, 0.375], [1.0, 0.0]])


class TestSemanticMerge:
    """Catches register-tile and panel tails, sigmoid saturation and the class/mask contraction."""

    @given(
        seed=st.integers(0, 2**32 - 1),
        n=st.integers(0, 40),
        c=st.integers(0, 70),
        hw=st.tuples(st.integers(1, 40), st.integers(1, 40)),
        scale=st.sampled_from([1.0, 8.0, 200.0]),
        dtypes=st.tuples(FLOAT_DTYPES, FLOAT_DTYPES),
    )
    def test_matches_reference(self, cpu_isa, device, seed, n, c, hw, scale, dtypes):
        rng = np.random.default_rng(seed)
        probs = rng.random((n, c)).astype(dtypes[0])
        logits = random_array(rng, (n, *hw), dtypes[1], scale)
        got = device.get(_C.semantic_merge(device.put(probs), device.put(logits)))
        want = ref.semantic_merge(probs.astype(np.float64), logits.astype(np.float64))
        assert got.shape == (c, *hw)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * max(n, 1))

    def test_real_size(self, cpu_isa, device):
        rng = np.random.default_rng(5)
        probs = rng.dirichlet(np.ones(151), 250)[:, :150].astype(np.float32)
        logits = random_array(rng, (250, 200, 272), np.float32, 6.0)
        got = device.get(_C.semantic_merge(device.put(probs), device.put(logits)))
        want = ref.semantic_merge(probs, logits)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        top2 = np.sort(want, axis=0)[-2:]
        clear = top2[1] - top2[0] > 1e-4 * top2[1]  # ties closer than float32 rounding may flip
        np.testing.assert_array_equal(got.argmax(0)[clear], want.argmax(0)[clear])


class TestThreads:
    """Catches shared scratch state: concurrent calls (the GIL is released) must not interfere."""

    def test_concurrent_calls_match_serial(self):
        from concurrent.futures import ThreadPoolExecutor

        rng = np.random.default_rng(11)
        jobs = [
            (random_array(rng, (96, 13, 13), np.float32), random_array(rng, (40, 30, 30), np.float32))
            for _ in range(16)
        ]
        serial = [_C.mask_pool(f, m) for f, m in jobs]
        with ThreadPoolExecutor(8) as pool:
            parallel = list(pool.map(lambda fm: _C.mask_pool(*fm), jobs))
        for a, b in zip(serial, parallel, strict=True):
            np.testing.assert_array_equal(a, b)


class TestBuildInfo:
    """Catches a build that lies about itself or a stale module."""

    def test_fields(self):
        info = _C.build_info()
        assert info["version"] == __version__
        assert isinstance(info["cuda"], bool) and isinstance(info["openmp"], bool)
        assert all(isinstance(a, str) for a in info["cuda_archs"])
        assert info["cuda"] == bool(info["cuda_archs"])
        assert info["cpu_isa"] in info["cpu_isas"] and "generic" in info["cpu_isas"]

    def test_cuda_available_implies_cuda_build(self):
        if _C.cuda_available():
            assert _C.build_info()["cuda"]

    def test_unknown_isa_is_refused(self):
        with pytest.raises(ValueError, match="unknown CPU instruction set"):
            _C.set_cpu_isa("sse1")


class TestResample:
    """Catches band detection off by one, empty bands, vector tails and the row/column order."""

    @given(
        seed=st.integers(0, 2**32 - 1),
        n=st.integers(0, 6),
        hw=st.tuples(st.integers(1, 20), st.integers(1, 20)),
        out_hw=st.tuples(st.integers(1, 50), st.integers(1, 50)),
        kinds=st.tuples(*[st.sampled_from(["bilinear", "dense", "holes"])] * 2),
        dtype=FLOAT_DTYPES,
    )
    def test_matches_reference(self, cpu_isa, device, seed, n, hw, out_hw, kinds, dtype):
        rng = np.random.default_rng(seed)
        x = random_array(rng, (n, *hw), dtype, 4.0)
        rows = band_matrix(rng, out_hw[0], hw[0], kinds[0])
        cols = band_matrix(rng, out_hw[1], hw[1], kinds[1])
        got = device.get(_C.resample(device.put(x), device.put(rows), device.put(cols)))
        want = ref.resample(x, rows, cols)
        assert got.shape == (n, *out_hw) and got.dtype == np.float32
        scale = np.abs(rows).sum(1).max() * np.abs(cols).sum(1).max() * 4.0 * 8
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * scale)

    def test_fcclip_resize_at_real_size(self, cpu_isa):
        from knnclip.engine.pipeline.postprocess import resize_matrices

        rng = np.random.default_rng(3)
        masks = random_array(rng, (250, 160, 216), np.float32, 8.0)
        rows, cols = resize_matrices((160, 216), (640, 864), (640, 853), (512, 683))
        got = _C.resample(masks, rows.astype(np.float32), cols.astype(np.float32))
        want = ref.resample(masks[:8], rows, cols)
        np.testing.assert_allclose(got[:8], want, rtol=1e-5, atol=1e-5)

    def test_bad_input(self):
        x = np.zeros((2, 3, 4), np.float32)
        rows, cols = np.zeros((5, 3), np.float32), np.zeros((6, 4), np.float32)
        with pytest.raises(ValueError, match="do not match"):
            _C.resample(x, rows.T.copy(), cols)
        with pytest.raises(TypeError, match="float32"):
            _C.resample(x, rows.astype(np.float16), cols)
        with pytest.raises(ValueError, match=r"\[N, h, w\]"):
            _C.resample(x[0], rows, cols)
        bad = x.copy()
        bad[1, 2, 3] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            _C.resample(bad, rows, cols)


class TestPanopticOwner:
    """Catches a wrong argmax (tie order, saturated sigmoid), tile tails and per-thread counts."""

    @given(
        seed=st.integers(0, 2**32 - 1),
        q=st.integers(1, 30),
        hw=st.tuples(st.integers(1, 40), st.integers(1, 60)),
        scale=st.sampled_from([1.0, 10.0, 120.0]),
        dtype=FLOAT_DTYPES,
    )
    def test_matches_reference(self, cpu_isa, device, seed, q, hw, scale, dtype):
        rng = np.random.default_rng(seed)
        masks = random_array(rng, (q, *hw), dtype, scale)
        queries = rng.choice(q, int(rng.integers(1, q + 1)), replace=False).astype(np.int64)
        scores = rng.random(len(queries)).astype(np.float32)
        found = _C.panoptic_owner(device.put(scores), device.put(masks), device.put(queries))
        owner, own, pixels = (device.get(a) for a in found)
        values = ref.panoptic_scores(scores, masks, queries)
        best = values.max(0)
        chosen = np.take_along_axis(values, owner[None].astype(np.int64), 0)[0]
        assert owner.dtype == np.int32 and own.dtype == bool and owner.shape == hw
        # The owner's value is the maximum up to float32 rounding; where the best is clear, it is the argmax.
        assert (chosen >= best - 1e-6 * np.maximum(best, 1e-30)).all()
        top2 = np.sort(values, 0)[-2:] if len(queries) > 1 else np.stack([np.full(hw, -1.0), best])
        clear = top2[1] - top2[0] > 1e-5 * top2[1]
        np.testing.assert_array_equal(owner[clear], values.argmax(0)[clear])
        kept = masks[queries].astype(np.float32)
        np.testing.assert_array_equal(own, np.take_along_axis(kept, owner[None].astype(np.int64), 0)[0] >= 0)
        np.testing.assert_array_equal(pixels, (kept >= 0).reshape(len(queries), -1).sum(1))

    def test_ties_and_saturation_go_to_the_first_query(self, cpu_isa):
        masks = np.array([[[-200.0, 30.0, 0.0]], [[-300.0, 40.0, 0.0]]], np.float32)  # sigmoid 0, 1, 0.5
        owner, own, pixels = _C.panoptic_owner(np.array([0.5, 0.5], np.float32), masks, np.array([0, 1]))
        assert owner.tolist() == [[0, 0, 0]] and own.tolist() == [[False, True, True]]
        assert pixels.tolist() == [2, 2]

    def test_bad_input(self):
        masks = np.zeros((3, 4, 5), np.float32)
        with pytest.raises(ValueError, match="index"):
            _C.panoptic_owner(np.ones(1, np.float32), masks, np.array([3]))
        with pytest.raises(ValueError, match="at least one"):
            _C.panoptic_owner(np.ones(0, np.float32), masks, np.zeros(0, np.int64))
        with pytest.raises(ValueError, match="differ"):
            _C.panoptic_owner(np.ones(2, np.float32), masks, np.array([0]))
        with pytest.raises(TypeError, match="int64"):
            _C.panoptic_owner(np.ones(1, np.float32), masks, np.array([0], np.int32))
        with pytest.raises(ValueError, match="NaN"):
            _C.panoptic_owner(np.array([np.nan], np.float32), masks, np.array([0]))


class TestSemanticArgmax:
    """Catches a running maximum that loses the first of equal classes or a class-tile tail."""

    @given(
        seed=st.integers(0, 2**32 - 1),
        n=st.integers(0, 30),
        c=st.integers(1, 40),
        hw=st.tuples(st.integers(1, 30), st.integers(1, 70)),
        dtypes=st.tuples(FLOAT_DTYPES, FLOAT_DTYPES),
        ties=st.booleans(),
    )
    def test_equals_argmax_of_semantic_merge(self, cpu_isa, device, seed, n, c, hw, dtypes, ties):
        rng = np.random.default_rng(seed)
        probs = rng.random((n, c)).astype(dtypes[0])
        if ties:  # duplicated class columns: equal scores, the first must win
            probs[:, c // 2 :] = probs[:, : c - c // 2]
        logits = random_array(rng, (n, *hw), dtypes[1], 5.0)
        got = device.get(_C.semantic_argmax(device.put(probs), device.put(logits)))
        assert got.dtype == np.int32 and got.shape == hw
        if device.kind == "cpu":  # the same float32 scores as semantic_merge's, NumPy's first-max rule
            np.testing.assert_array_equal(got, _C.semantic_merge(probs, logits).argmax(0))
        scores = ref.semantic_merge(probs.astype(np.float64), logits.astype(np.float64))
        top2 = np.sort(scores, axis=0)[-2:] if c > 1 else np.stack([np.full(hw, -1.0), scores[0]])
        clear = top2[1] - top2[0] > 1e-4 * np.abs(top2[1])
        np.testing.assert_array_equal(got[clear], scores.argmax(0)[clear])

    def test_bad_input(self):
        with pytest.raises(ValueError, match="at least one class"):
            _C.semantic_argmax(np.zeros((2, 0), np.float32), np.zeros((2, 3, 3), np.float32))
        with pytest.raises(ValueError, match="disagree"):
            _C.semantic_argmax(np.zeros((2, 4), np.float32), np.zeros((3, 3, 3), np.float32))
        with pytest.raises(ValueError, match="NaN"):
            _C.semantic_argmax(np.full((1, 1), np.nan, np.float32), np.zeros((1, 3, 3), np.float32))
