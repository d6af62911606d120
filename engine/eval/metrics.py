"""Segmentation metrics: mIoU from a streaming confusion matrix, and panoptic quality.

Semantic (as detectron2's SemSegEvaluator and mmseg): IoU of class c = TP / (TP + FP + FN) over
all images accumulated; a class absent from both the ground truth and the predictions has no IoU
(NaN) and is left out of the mean. Pixels labelled ``ignore`` count nowhere.

Panoptic (the COCO panoptic definition, Kirillov et al. 2019, as panopticapi computes it): a
predicted and a ground-truth segment of the same class match when their IoU exceeds 0.5, where
the union leaves out the predicted pixels that fall on void ground truth; matches are TPs,
unmatched non-crowd ground-truth segments FNs, unmatched predictions FPs unless more than half of
them lies on void or on a crowd region of their class. PQ_c = sum(IoU of TPs) / (TP + FP/2 + FN/2)
for each class with TP + FP + FN > 0, averaged over those classes; SQ = sum IoU / TP, RQ = TP /
(TP + FP/2 + FN/2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from knnclip.engine.errors import InvalidInputError


class ConfusionMatrix:
    """``cm.update(pred, gt)`` per image, then ``cm.iou()``, ``cm.miou()``, ``cm.pixel_accuracy()``.

    ``pred`` and ``gt`` are integer maps of class indices in ``[0, num_classes)``; ``gt`` may hold
    ``ignore``; a prediction outside the range counts as wrong for the pixel's true class.
    """

    def __init__(self, num_classes: int, ignore: int = 255) -> None:
        if num_classes < 1:
            raise InvalidInputError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore = ignore
        # One extra row/column collects predictions outside the vocabulary.
        self.matrix = np.zeros((num_classes + 1, num_classes + 1), np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.shape != gt.shape:
            raise InvalidInputError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
        for what, array in (("prediction", pred), ("ground truth", gt)):
            if not np.issubdtype(array.dtype, np.integer):
                raise InvalidInputError(f"{what} must hold integer class indices, got {array.dtype}")
        valid = gt != self.ignore
        g = gt[valid].astype(np.int64)
        if g.size and (g.min() < 0 or g.max() >= self.num_classes):
            raise InvalidInputError(f"ground truth holds labels outside [0, {self.num_classes}) other than ignore")
        p = pred[valid].astype(np.int64)
        p = np.where((p >= 0) & (p < self.num_classes), p, self.num_classes)
        n = self.num_classes + 1
        self.matrix += np.bincount(g * n + p, minlength=n * n).reshape(n, n)

    def merge(self, other: ConfusionMatrix) -> None:
        """Add another matrix's counts (from a parallel worker)."""
        if other.num_classes != self.num_classes:
            raise InvalidInputError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self.matrix += other.matrix

    def iou(self) -> np.ndarray:
        """[num_classes] IoU per class; NaN where the class is in neither ground truth nor predictions."""
        tp = np.diag(self.matrix)[: self.num_classes].astype(np.float64)
        gt = self.matrix[: self.num_classes].sum(1)
        pred = self.matrix[:, : self.num_classes].sum(0)
        union = gt + pred - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def miou(self, classes: Sequence[int] | np.ndarray | None = None) -> float:
        """Mean IoU over the classes that have one (or over those of them in ``classes``)."""
        iou = self.iou()
        if classes is not None:
            iou = iou[np.asarray(classes, np.int64)]
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.matrix[: self.num_classes].sum()
        return float(np.trace(self.matrix[: self.num_classes, : self.num_classes]) / total) if total else float("nan")

    def most_confused(self, n: int = 10) -> list[tuple[int, int, int]]:
        """The ``n`` largest off-diagonal counts: (true class, predicted class, pixels)."""
        m = self.matrix[: self.num_classes, : self.num_classes].copy()
        np.fill_diagonal(m, 0)
        order = np.argsort(m, axis=None)[::-1][:n]
        return [(int(i // m.shape[1]), int(i % m.shape[1]), int(m.flat[i])) for i in order if m.flat[i] > 0]


class PanopticQuality:
    """Streaming PQ/SQ/RQ over images, per class and for all, things and stuff.

    Per image, ``update(pred, pred_segments, gt, gt_segments)``: ``pred`` and ``gt`` are integer
    maps of segment ids (0 = void / unlabelled), ``pred_segments`` maps each predicted id to its
    class index, ``gt_segments`` maps each ground-truth id to ``(class index, is_crowd)``. Every
    non-zero id in a map must be described, and every class index lie in ``[0, num_classes)``.
    """

    def __init__(self, num_classes: int, is_thing: Sequence[bool]) -> None:
        if num_classes < 1 or len(is_thing) != num_classes:
            raise InvalidInputError(
                f"need num_classes >= 1 and one thing flag per class, got {num_classes}, {len(is_thing)}"
            )
        self.num_classes = num_classes
        self.is_thing = np.asarray(is_thing, bool)
        self.iou_sum = np.zeros(num_classes, np.float64)
        self.tp = np.zeros(num_classes, np.int64)
        self.fp = np.zeros(num_classes, np.int64)
        self.fn = np.zeros(num_classes, np.int64)

    def _categories(self, ids: np.ndarray, segments: Mapping[int, Any], what: str, crowd: bool) -> tuple:
        cats = np.full(len(ids), -1, np.int64)
        crowds = np.zeros(len(ids), bool)
        for i, sid in enumerate(ids.tolist()):
            if sid == 0:
                continue
            if sid not in segments:
                raise InvalidInputError(f"{what} segment id {sid} appears in the map but is not described")
            info = segments[sid]
            cat, is_crowd = (int(info[0]), bool(info[1])) if crowd else (int(info), False)
            if not 0 <= cat < self.num_classes:
                raise InvalidInputError(f"{what} segment {sid} has class {cat} outside [0, {self.num_classes})")
            cats[i], crowds[i] = cat, is_crowd
        return cats, crowds

    def update(
        self,
        pred: np.ndarray,
        pred_segments: Mapping[int, int],
        gt: np.ndarray,
        gt_segments: Mapping[int, tuple[int, bool]],
    ) -> None:
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.shape != gt.shape or pred.ndim != 2:
            raise InvalidInputError(f"prediction {pred.shape} and ground truth {gt.shape} must be equal 2-d maps")
        gt_ids, g = np.unique(gt.astype(np.int64), return_inverse=True)
        pred_ids, p = np.unique(pred.astype(np.int64), return_inverse=True)
        joint = np.bincount(g.ravel() * len(pred_ids) + p.ravel(), minlength=len(gt_ids) * len(pred_ids))
        joint = joint.reshape(len(gt_ids), len(pred_ids))
        gt_area, pred_area = joint.sum(1), joint.sum(0)
        gt_cat, gt_crowd = self._categories(gt_ids, gt_segments, "ground-truth", crowd=True)
        pred_cat, _ = self._categories(pred_ids, pred_segments, "predicted", crowd=False)
        on_void = joint[gt_ids == 0].sum(0) if (gt_ids == 0).any() else np.zeros(len(pred_ids), np.int64)

        real_gt = gt_cat >= 0
        real_pred = pred_cat >= 0
        candidate = (
            (joint > 0)
            & real_gt[:, None]
            & ~gt_crowd[:, None]
            & real_pred[None, :]
            & (gt_cat[:, None] == pred_cat[None, :])
        )
        union = gt_area[:, None] + pred_area[None, :] - joint - on_void[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(candidate, joint / np.maximum(union, 1), 0.0)
        # IoU > 0.5 makes a match unique: a segment cannot overlap two others by more than half.
        gi, pi = np.nonzero(iou > 0.5)
        np.add.at(self.tp, gt_cat[gi], 1)
        np.add.at(self.iou_sum, gt_cat[gi], iou[gi, pi])
        matched_gt = np.zeros(len(gt_ids), bool)
        matched_gt[gi] = True
        matched_pred = np.zeros(len(pred_ids), bool)
        matched_pred[pi] = True

        missed = real_gt & ~gt_crowd & ~matched_gt
        np.add.at(self.fn, gt_cat[missed], 1)
        # An unmatched prediction lying mostly on void or on a crowd region of its class is no FP.
        crowd_of_class = real_gt[:, None] & gt_crowd[:, None] & (gt_cat[:, None] == pred_cat[None, :])
        on_crowd = (joint * crowd_of_class).sum(0)
        ignored = (on_void + on_crowd) > 0.5 * pred_area
        false = real_pred & ~matched_pred & ~ignored
        np.add.at(self.fp, pred_cat[false], 1)

    def merge(self, other: PanopticQuality) -> None:
        if other.num_classes != self.num_classes:
            raise InvalidInputError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        for name in ("iou_sum", "tp", "fp", "fn"):
            getattr(self, name).__iadd__(getattr(other, name))

    def per_class(self) -> dict[str, np.ndarray]:
        """PQ, SQ, RQ per class (NaN for classes with no TP, FP or FN)."""
        denom = self.tp + 0.5 * self.fp + 0.5 * self.fn
        with np.errstate(invalid="ignore", divide="ignore"):
            pq = np.where(denom > 0, self.iou_sum / denom, np.nan)
            sq = np.where(denom > 0, np.where(self.tp > 0, self.iou_sum / np.maximum(self.tp, 1), 0.0), np.nan)
            rq = np.where(denom > 0, self.tp / denom, np.nan)
        return {"pq": pq, "sq": sq, "rq": rq}

    def summary(self) -> dict[str, dict[str, float]]:
        """``{"all"|"things"|"stuff": {"pq", "sq", "rq", "n"}}``, PQ etc. in [0, 1] (NaN where n = 0)."""
        per = self.per_class()
        counted = np.isfinite(per["pq"])
        out = {}
        for group, member in (("all", np.ones_like(counted)), ("things", self.is_thing), ("stuff", ~self.is_thing)):
            use = counted & member
            n = int(use.sum())
            out[group] = {k: float(per[k][use].mean()) if n else float("nan") for k in ("pq", "sq", "rq")}
            out[group]["n"] = n
        return out
