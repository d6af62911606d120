"""Every bad input to knnclip._C gets a specific TypeError or ValueError naming the argument,
never a crash or a silent NaN."""

from __future__ import annotations

import numpy as np
import pytest

from knnclip import _C
from knnclip.engine.bench import reference_ops as ref

F = np.float32


def masks(n=2, h=4, w=4):
    return np.zeros((n, h, w), F)


class TestNonFinite:
    """Catches NaN/Inf slipping through into probabilities and segments."""

    @pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
    def test_mask_pool_features(self, bad):
        features = np.ones((3, 4, 4), F)
        features[1, 2, 3] = bad
        with pytest.raises(ValueError, match="mask_pool: features contains NaN or Inf"):
            _C.mask_pool(features, masks())

    def test_mask_pool_logits_float16(self):
        logits = masks().astype(np.float16)
        logits[0, 0, 0] = np.float16("inf")
        with pytest.raises(ValueError, match="mask_logits contains NaN or Inf"):
            _C.mask_pool(np.ones((3, 4, 4), F), logits)

    def test_mask_pool_nan_mask_anywhere_sampled(self):
        logits = np.zeros((2, 16, 16), F)
        logits[1] = np.nan  # a whole mask gone bad: whichever rows the resize reads hold NaN
        with pytest.raises(ValueError, match="mask_pool: mask_logits contains NaN or Inf"):
            _C.mask_pool(np.ones((3, 4, 4), F), logits)

    def test_mask_pool_ignores_rows_the_resize_never_reads(self):
        # 16 -> 4 rows, align_corners=False: source row 4 * (i + 0.5) - 0.5 = 1.5, 5.5, 9.5, 13.5,
        # so rows 1, 2, 5, 6, 9, 10, 13, 14 are read and row 0 never is. Only the rows that can
        # change the result are scanned (a whole-array scan cost a third of the op).
        rng = np.random.default_rng(3)
        features = rng.standard_normal((3, 4, 4)).astype(F)
        logits = rng.standard_normal((2, 16, 16)).astype(F)
        want = ref.mask_pool(features.astype(np.float64), logits.astype(np.float64))
        logits[0, 0, :] = np.nan
        np.testing.assert_allclose(_C.mask_pool(features, logits), want, rtol=1e-5, atol=1e-6)
        logits[0, 1, 5] = np.inf  # row 1 is read
        with pytest.raises(ValueError, match="mask_logits contains NaN or Inf"):
            _C.mask_pool(features, logits)

    def test_retrieval_sims_of_real_neighbour(self):
        with pytest.raises(ValueError, match="sims .* contains NaN or Inf"):
            _C.retrieval_probs(np.array([[np.nan, 0.1]], F), np.array([[0, 1]], np.int64), 2, 0.1)

    @pytest.mark.parametrize("which", ["p_base", "p_ret"])
    def test_fuse(self, which):
        args = {"p_base": np.full((2, 3), 1 / 3, F), "p_ret": np.full((2, 3), 1 / 3, F)}
        args[which][1, 1] = np.nan
        with pytest.raises(ValueError, match=f"fuse: {which} contains NaN or Inf"):
            _C.fuse(args["p_base"], args["p_ret"], 0.5, 0.5)

    @pytest.mark.parametrize("which", ["class_probs", "mask_logits"])
    def test_semantic_merge(self, which):
        args = {"class_probs": np.full((2, 3), 0.5, F), "mask_logits": np.zeros((2, 5, 5), F)}
        args[which].flat[-1] = np.inf
        with pytest.raises(ValueError, match=f"semantic_merge: {which} contains NaN or Inf"):
            _C.semantic_merge(args["class_probs"], args["mask_logits"])

    def test_check_false_skips_the_scan(self):
        features = np.ones((3, 4, 4), F)
        features[0, 0, 0] = np.nan
        out = _C.mask_pool(features, np.ones((1, 4, 4), F), check=False)
        assert np.isnan(out[0, 0]) and np.all(out[0, 1:] == 1.0)

    @pytest.mark.parametrize("name,value", [("threshold", np.nan), ("threshold", np.inf)])
    def test_scalar_threshold(self, name, value):
        with pytest.raises(ValueError, match="threshold must be finite"):
            _C.mask_pool(np.ones((3, 4, 4), F), masks(), value)


class TestDtypes:
    """Catches silent casts: float64, ints or Python lists are refused with the fix named."""

    def test_float64_features(self):
        with pytest.raises(TypeError, match=r"mask_pool: features has dtype float64; expected float32 or float16"):
            _C.mask_pool(np.ones((3, 4, 4)), masks())

    def test_integer_mask_logits(self):
        with pytest.raises(TypeError, match="mask_logits has dtype int32"):
            _C.mask_pool(np.ones((3, 4, 4), F), np.ones((2, 4, 4), np.int32))

    @pytest.mark.parametrize("dtype", [np.int32, np.uint64, np.float32])
    def test_labels_must_be_int64(self, dtype):
        with pytest.raises(TypeError, match="retrieval_probs: labels has dtype .*; expected int64"):
            _C.retrieval_probs(np.zeros((2, 3), F), np.zeros((2, 3), dtype), 4, 0.1)

    def test_big_endian(self):
        with pytest.raises(TypeError, match="p_base has dtype >f4"):
            _C.fuse(np.zeros((2, 3), ">f4"), np.zeros((2, 3), F), 0.5, 0.5)

    def test_python_list(self):
        with pytest.raises(TypeError, match="class_probs must be a NumPy array or a CUDA array .*got list"):
            _C.semantic_merge([[0.5]], np.zeros((1, 2, 2), F))

    def test_none(self):
        with pytest.raises(TypeError, match="sims must be a NumPy array"):
            _C.retrieval_probs(None, np.zeros((1, 1), np.int64), 1, 0.1)


class TestShapes:
    """Catches out-of-bounds reads from inconsistent shapes."""

    @pytest.mark.parametrize(
        "features,logits,match",
        [
            ((4, 4), (2, 4, 4), r"features must be \[C, H, W\] or \[B, C, H, W\], got shape \(4, 4\)"),
            ((3, 4, 4), (4, 4), r"mask_logits must be \[N, h, w\]"),
            ((1, 3, 4, 4), (2, 4, 4), "both be unbatched"),
            ((2, 3, 4, 4), (3, 2, 4, 4), "batch sizes differ"),
            ((3, 0, 4), (2, 4, 4), "features has an empty spatial size"),
            ((3, 4, 4), (2, 4, 0), "mask_logits has an empty spatial size"),
        ],
    )
    def test_mask_pool(self, features, logits, match):
        with pytest.raises(ValueError, match=match):
            _C.mask_pool(np.ones(features, F), np.ones(logits, F))

    def test_retrieval_shape_mismatch(self):
        with pytest.raises(ValueError, match=r"sims \(2, 3\) and labels \(2, 4\) must have the same shape"):
            _C.retrieval_probs(np.zeros((2, 3), F), np.zeros((2, 4), np.int64), 5, 0.1)

    def test_retrieval_1d(self):
        with pytest.raises(ValueError, match=r"sims must be \[N, k\]"):
            _C.retrieval_probs(np.zeros(3, F), np.zeros(3, np.int64), 5, 0.1)

    def test_fuse_shape_mismatch(self):
        with pytest.raises(ValueError, match="must have the same shape"):
            _C.fuse(np.zeros((2, 3), F), np.zeros((2, 4), F), 0.5, 0.5)

    def test_semantic_merge_mask_count(self):
        with pytest.raises(ValueError, match="disagree on the number of masks N"):
            _C.semantic_merge(np.zeros((3, 5), F), np.zeros((4, 8, 8), F))


class TestValues:
    """Catches out-of-range labels (memory safety) and meaningless hyper-parameters."""

    @pytest.mark.parametrize("label", [5, 100, -2, np.iinfo(np.int64).min])
    def test_label_out_of_range(self, label):
        labels = np.array([[0, label]], np.int64)
        with pytest.raises(ValueError, match=r"labels must be -1 \(no neighbour\) or a class id in \[0, num_classes\)"):
            _C.retrieval_probs(np.zeros((1, 2), F), labels, 5, 0.1)

    @pytest.mark.parametrize("tau", [0.0, -1.0, np.nan, np.inf])
    def test_tau(self, tau):
        with pytest.raises(ValueError, match="tau must be a finite number > 0"):
            _C.retrieval_probs(np.zeros((1, 2), F), np.zeros((1, 2), np.int64), 5, tau)

    def test_negative_num_classes(self):
        with pytest.raises(ValueError, match="num_classes must be >= 0"):
            _C.retrieval_probs(np.zeros((1, 2), F), -np.ones((1, 2), np.int64), -1, 0.1)

    @pytest.mark.parametrize("lam", [-0.1, 1.5, np.nan])
    def test_lam(self, lam):
        with pytest.raises(ValueError, match=r"lam must be in \[0, 1\]"):
            _C.fuse(np.zeros((2, 3), F), np.zeros((2, 3), F), 0.5, lam)

    def test_T_nan(self):
        with pytest.raises(ValueError, match="T must be finite"):
            _C.fuse(np.zeros((2, 3), F), np.zeros((2, 3), F), np.nan, 0.5)


class FakeCudaArray:
    """Claims to be a CUDA array but points at host memory."""

    def __init__(self, host: np.ndarray) -> None:
        self._host = host
        self.__cuda_array_interface__ = {
            "shape": host.shape,
            "typestr": "<f4",
            "data": (host.ctypes.data, False),
            "strides": None,
            "version": 3,
        }


class TestDeviceArguments:
    """Catches host pointers passed off as device memory and mixed host/device calls."""

    def test_host_pointer_claiming_cuda(self):
        fake = FakeCudaArray(np.ones((2, 3), F))
        if _C.build_info()["cuda"]:
            with pytest.raises(ValueError, match="its pointer is not CUDA device memory"):
                _C.fuse(fake, fake, 0.5, 0.5)
        else:
            with pytest.raises(TypeError, match="built without CUDA kernels"):
                _C.fuse(fake, fake, 0.5, 0.5)

    def test_non_contiguous_cuda_array(self):
        fake = FakeCudaArray(np.ones((2, 3), F))
        fake.__cuda_array_interface__["strides"] = (4, 8)
        expected = (ValueError, "non-contiguous CUDA array") if _C.build_info()["cuda"] else (TypeError, "without CUDA")
        with pytest.raises(expected[0], match=expected[1]):
            _C.fuse(fake, fake, 0.5, 0.5)

    def test_unknown_dlpack_device(self):
        class OnSomeAccelerator:
            def __dlpack_device__(self):
                return (9, 0)  # Vulkan

        with pytest.raises(TypeError, match="lives on DLPack device type 9"):
            _C.fuse(OnSomeAccelerator(), np.zeros((1, 1), F), 0.5, 0.5)

    def test_host_dlpack_producer_is_accepted(self):
        class HostProducer:
            def __init__(self, a):
                self.a = a

            def __dlpack__(self, **kwargs):
                return self.a.__dlpack__(**kwargs)

            def __dlpack_device__(self):
                return self.a.__dlpack_device__()

        base = np.array([[0.2, 0.8]], F)
        out = _C.fuse(HostProducer(base), HostProducer(base), 0.5, 1.0)
        np.testing.assert_array_equal(out, base)


def test_module_survives_bad_calls():
    """A burst of rejected calls leaves the module working (no leaked state, no crash)."""
    for _ in range(200):
        with pytest.raises((TypeError, ValueError)):
            _C.mask_pool(np.ones((3, 4, 4)), masks())
    np.testing.assert_array_equal(_C.mask_pool(np.ones((3, 4, 4), F), np.ones((1, 4, 4), F)), [[1, 1, 1]])
