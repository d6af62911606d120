"""float64 references of the metrics, written from their definitions: IoU per class from pixel
counts, and panoptic quality from matched segment pairs."""

from __future__ import annotations

import numpy as np


def reference_iou(preds, gts, num_classes, ignore):
    """IoU per class from the definition: per class, count TP, FP, FN pixel by pixel."""
    tp = np.zeros(num_classes)
    fp = np.zeros(num_classes)
    fn = np.zeros(num_classes)
    for pred, gt in zip(preds, gts, strict=True):
        keep = gt != ignore
        for c in range(num_classes):
            tp[c] += np.sum((pred == c) & (gt == c) & keep)
            fp[c] += np.sum((pred == c) & (gt != c) & keep)
            fn[c] += np.sum((pred != c) & (gt == c) & keep)
    union = tp + fp + fn
    return np.array([tp[c] / union[c] if union[c] else np.nan for c in range(num_classes)], np.float64)


def reference_pq(pairs, num_classes):
    """PQ per class from the COCO panoptic definition, segment pair by segment pair.

    ``pairs`` is a list of (pred, pred_segments, gt, gt_segments) as PanopticQuality takes them."""
    iou_sum = np.zeros(num_classes)
    tp = np.zeros(num_classes)
    fp = np.zeros(num_classes)
    fn = np.zeros(num_classes)
    for pred, pred_segments, gt, gt_segments in pairs:
        void = gt == 0
        matched_pred = set()
        for gid, (gcat, crowd) in gt_segments.items():
            g = gt == gid
            if not g.any() or crowd:
                continue
            hit = False
            for pid, pcat in pred_segments.items():
                p = pred == pid
                if pcat != gcat or not p.any():
                    continue
                inter = np.sum(g & p)
                union = np.sum(g | p) - np.sum(p & void)
                if inter / union > 0.5:
                    tp[gcat] += 1
                    iou_sum[gcat] += inter / union
                    matched_pred.add(pid)
                    hit = True
            if not hit:
                fn[gcat] += 1
        for pid, pcat in pred_segments.items():
            p = pred == pid
            if pid in matched_pred or not p.any():
                continue
            crowd_same = np.zeros_like(p)
            for gid, (gcat, crowd) in gt_segments.items():
                if crowd and gcat == pcat:
                    crowd_same |= gt == gid
            if np.sum(p & (void | crowd_same)) / np.sum(p) > 0.5:
                continue
            fp[pcat] += 1
    denom = tp + fp / 2 + fn / 2
    return np.where(denom > 0, iou_sum / np.where(denom > 0, denom, 1), np.nan)
