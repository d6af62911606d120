"""mIoU and PQ against independent computations: a float64 confusion matrix written here with
plain loops over classes, a per-segment-pair PQ written from the COCO definition, and hand-built
cases whose answers are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from knnclip.engine.errors import InvalidInputError
from knnclip.engine.eval.metrics import ConfusionMatrix, PanopticQuality
from tests.support.metrics_reference import reference_iou, reference_pq


@st.composite
def label_maps(draw):
    c = draw(st.integers(1, 12))
    n = draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    seeds = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seeds)
    ignore = 255
    preds, gts = [], []
    for _ in range(n):
        gt = rng.integers(0, c, (h, w))
        gt[rng.random((h, w)) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = ignore
        # predictions: in range, out of range (negative, >= c) and ignore-valued
        pred = rng.integers(-2, c + 3, (h, w))
        preds.append(pred)
        gts.append(gt)
    return c, ignore, preds, gts


class TestMeanIoU:
    """Catches a confusion matrix that counts ignore pixels, drops out-of-range predictions, or
    averages over classes that never occur."""

    @given(label_maps())
    def test_matches_per_class_definition(self, case):
        c, ignore, preds, gts = case
        cm = ConfusionMatrix(c, ignore)
        for p, g in zip(preds, gts, strict=True):
            cm.update(p, g)
        expected = reference_iou(preds, gts, c, ignore)
        np.testing.assert_allclose(cm.iou(), expected, rtol=0, atol=1e-12)
        if np.isfinite(expected).any():
            assert cm.miou() == pytest.approx(np.nanmean(expected), abs=1e-12)
        else:
            assert np.isnan(cm.miou())

    def test_uint16_labels_with_65535_ignore(self):
        gt = np.array([[0, 846, 65535]], np.uint16)
        pred = np.array([[0, 5, 3]], np.int32)
        cm = ConfusionMatrix(847, ignore=65535)
        cm.update(pred, gt)
        iou = cm.iou()
        assert iou[0] == 1.0 and iou[846] == 0.0 and iou[5] == 0.0 and np.isnan(iou[3])
        assert cm.miou() == pytest.approx(1 / 3)
        assert cm.pixel_accuracy() == 0.5

    def test_perfect_all_ignored_and_subset(self):
        cm = ConfusionMatrix(3)
        cm.update(np.full((2, 2), 7), np.full((2, 2), 255))
        assert np.isnan(cm.miou()) and np.isnan(cm.pixel_accuracy())
        gt = np.array([[0, 1], [2, 2]])
        cm.update(gt, gt)
        assert cm.miou() == 1.0 and cm.miou(classes=[1]) == 1.0
        cm.update(np.zeros((2, 2), np.int64), gt)  # everything predicted 0: IoU 0 = 2/5, 1 = 1/2, 2 = 2/4
        np.testing.assert_allclose(cm.iou(), [2 / 5, 1 / 2, 2 / 4])
        assert cm.most_confused(2) == [(2, 0, 2), (1, 0, 1)]

    def test_bad_input_is_refused(self):
        cm = ConfusionMatrix(3)
        with pytest.raises(InvalidInputError, match="shape"):
            cm.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
        with pytest.raises(InvalidInputError, match="outside"):
            cm.update(np.zeros((1, 1), int), np.full((1, 1), 3))
        with pytest.raises(InvalidInputError, match="integer"):
            cm.update(np.zeros((1, 1), np.float32), np.zeros((1, 1), int))


def pq_of(pairs, num_classes=3, things=(True, False, True)):
    metric = PanopticQuality(num_classes, things)
    for pair in pairs:
        metric.update(*pair)
    return metric


class TestPanopticQuality:
    """Catches PQ that matches at IoU >= 0.5 instead of > 0.5, counts void or crowd pixels as
    false positives, or averages over classes with nothing in them."""

    def test_perfect(self):
        gt = np.array([[1, 1, 2], [3, 3, 0]])
        segments = {1: (0, False), 2: (1, False), 3: (2, False)}
        metric = pq_of([(gt, {k: v[0] for k, v in segments.items()}, gt, segments)])
        s = metric.summary()
        assert s["all"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 3}
        assert s["things"]["n"] == 2 and s["stuff"]["n"] == 1

    def test_empty_prediction(self):
        gt = np.array([[1, 1], [2, 0]])
        metric = pq_of([(np.zeros_like(gt), {}, gt, {1: (0, False), 2: (1, False)})])
        assert metric.fn.tolist() == [1, 1, 0] and metric.fp.sum() == 0
        assert metric.summary()["all"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 2}

    def test_segment_split_in_two(self):
        gt = np.ones((1, 10), np.int64)  # one class-0 segment of 10 pixels
        pred = np.array([[5] * 6 + [6] * 4])  # split 6 + 4: the 6 matches (IoU 0.6), the 4 is an FP
        metric = pq_of([(pred, {5: 0, 6: 0}, gt, {1: (0, False)})])
        assert (metric.tp[0], metric.fp[0], metric.fn[0]) == (1, 1, 0)
        assert metric.per_class()["pq"][0] == pytest.approx(0.6 / 1.5)
        per = metric.per_class()
        assert per["sq"][0] == pytest.approx(0.6) and per["rq"][0] == pytest.approx(1 / 1.5)
        half = np.array([[5] * 5 + [6] * 5])  # 5 + 5: IoU exactly 0.5 is no match
        metric = pq_of([(half, {5: 0, 6: 0}, gt, {1: (0, False)})])
        assert (metric.tp[0], metric.fp[0], metric.fn[0]) == (0, 2, 1) and metric.per_class()["pq"][0] == 0.0

    def test_crowd_region_is_not_a_false_positive(self):
        # gt: a crowd of class 0 (id 9) and a normal class-1 segment (id 1)
        gt = np.array([[9, 9, 9, 1, 1]])
        segments = {9: (0, True), 1: (1, False)}
        pred = np.array([[4, 4, 4, 2, 2]])  # class 0 over the crowd, class 1 correct
        metric = pq_of([(pred, {4: 0, 2: 1}, gt, segments)])
        assert metric.fp.sum() == 0 and metric.fn.sum() == 0 and metric.tp.tolist() == [0, 1, 0]
        assert metric.summary()["all"]["n"] == 1  # the crowd's class has no TP, FP or FN: not counted
        # a prediction of another class over the crowd is an FP
        metric = pq_of([(pred, {4: 2, 2: 1}, gt, segments)])
        assert metric.fp.tolist() == [0, 0, 1]

    def test_void_is_left_out_of_the_union_and_of_false_positives(self):
        gt = np.array([[1, 1, 0, 0]])
        pred = np.array([[3, 3, 3, 3]])  # covers the segment and as much void: IoU 2 / (4 + 2 - 2 - 2) = 1
        metric = pq_of([(pred, {3: 0}, gt, {1: (0, False)})])
        assert metric.per_class()["pq"][0] == 1.0
        only_void = pq_of([(np.array([[0, 0, 7, 7]]), {7: 2}, gt, {1: (0, False)})])
        assert only_void.fp.sum() == 0 and only_void.fn.tolist() == [1, 0, 0]

    @given(st.integers(0, 2**32 - 1), st.integers(1, 4))
    def test_random_maps_match_the_pairwise_definition(self, seed, images):
        rng = np.random.default_rng(seed)
        pairs = []
        for _ in range(images):
            h, w = rng.integers(1, 8, 2)
            gt = rng.integers(0, 5, (h, w))
            pred = rng.integers(0, 5, (h, w))
            # blocky maps make IoU > 0.5 matches common
            gt = np.repeat(np.repeat(gt, 2, 0), 3, 1)
            pred = np.where(rng.random(gt.shape) < 0.8, gt + 10 * (gt > 0), np.repeat(np.repeat(pred, 2, 0), 3, 1))
            gt_segments = {i: (int(rng.integers(3)), bool(rng.random() < 0.2)) for i in range(1, 5)}
            pred_segments = {i: int(rng.integers(3)) for i in list(range(1, 5)) + list(range(11, 15))}
            for i in range(11, 15):  # keep most predictions of the same class as their source
                if rng.random() < 0.7:
                    pred_segments[i] = gt_segments[i - 10][0]
            pairs.append((pred, pred_segments, gt, gt_segments))
        metric = pq_of(pairs)
        np.testing.assert_allclose(metric.per_class()["pq"], reference_pq(pairs, 3), rtol=0, atol=1e-12)

    def test_undescribed_segment_is_refused(self):
        with pytest.raises(InvalidInputError, match="not described"):
            pq_of([(np.array([[4]]), {}, np.array([[1]]), {1: (0, False)})])
        with pytest.raises(InvalidInputError, match="outside"):
            pq_of([(np.array([[4]]), {4: 3}, np.array([[1]]), {1: (0, False)})])
