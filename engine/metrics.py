"""Semantic segmentation metrics from a streaming confusion matrix.

IoU of class c = TP / (TP + FP + FN) over all images accumulated; a class absent from both the
ground truth and the predictions has no IoU (NaN) and is left out of the mean, as the standard
evaluators (detectron2's SemSegEvaluator, mmseg) do. Pixels labelled ``ignore`` count nowhere.
"""

from __future__ import annotations

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
        if pred.shape != gt.shape:
            raise InvalidInputError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
        valid = gt != self.ignore
        g = gt[valid].astype(np.int64)
        if g.size and (g.min() < 0 or g.max() >= self.num_classes):
            raise InvalidInputError(f"ground truth holds labels outside [0, {self.num_classes}) other than ignore")
        p = pred[valid].astype(np.int64)
        p = np.where((p >= 0) & (p < self.num_classes), p, self.num_classes)
        n = self.num_classes + 1
        self.matrix += np.bincount(g * n + p, minlength=n * n).reshape(n, n)

    def iou(self) -> np.ndarray:
        """[num_classes] IoU per class; NaN where the class is in neither ground truth nor predictions."""
        tp = np.diag(self.matrix)[: self.num_classes].astype(np.float64)
        gt = self.matrix[: self.num_classes].sum(1)
        pred = self.matrix[:, : self.num_classes].sum(0)
        union = gt + pred - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def miou(self) -> float:
        iou = self.iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.matrix[: self.num_classes].sum()
        return float(np.trace(self.matrix[: self.num_classes, : self.num_classes]) / total) if total else float("nan")
