"""NumPy float64 references of the knnclip._C ops, written from the definitions in docs/ops.md.

Deliberately plain: whole-array NumPy, no shared code with csrc/. The one float32 step is the
bilinear source coordinate, which the definition (PyTorch's ``F.interpolate(mode="bilinear",
align_corners=False)`` on float32 masks, as FC-CLIP calls it) computes in float32.
"""

from __future__ import annotations

import numpy as np


def bilinear_axis(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (lo, hi) and the weight of hi for each output position along one axis."""
    scale = np.float32(size_in) / np.float32(size_out)
    dst = np.arange(size_out, dtype=np.float32)
    src = (scale * (dst + np.float32(0.5)) - np.float32(0.5)).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    lo = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    hi = np.minimum(lo + 1, size_in - 1)
    w = np.clip(src.astype(np.float64) - lo, 0.0, 1.0)
    return lo, hi, w


def resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize [..., h, w] to [..., height, width] (align_corners=False, no antialias), float64."""
    x = np.asarray(x, dtype=np.float64)
    y_lo, y_hi, wy = bilinear_axis(x.shape[-2], height)
    x_lo, x_hi, wx = bilinear_axis(x.shape[-1], width)
    top = x[..., y_lo, :]
    bottom = x[..., y_hi, :]
    top = top[..., x_lo] * (1 - wx) + top[..., x_hi] * wx
    bottom = bottom[..., x_lo] * (1 - wx) + bottom[..., x_hi] * wx
    return top * (1 - wy)[:, None] + bottom * wy[:, None]


def mask_pool(features: np.ndarray, mask_logits: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """Mean of features inside each binarised, resized mask; zeros for an empty mask."""
    if features.ndim == 4:
        return np.stack([mask_pool(f, m, threshold) for f, m in zip(features, mask_logits, strict=True)])
    c, h, w = features.shape
    inside = resize_bilinear(mask_logits, h, w) > threshold  # [N, H, W]
    inside = inside.reshape(inside.shape[0], h * w).astype(np.float64)
    counts = inside.sum(axis=1)
    sums = inside @ np.asarray(features, np.float64).reshape(c, -1).T
    return np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], 0.0)


def retrieval_probs(sims: np.ndarray, labels: np.ndarray, num_classes: int, tau: float) -> np.ndarray:
    """P[i, c] = sum of softmax(sims[i] / tau) over row i's real neighbours (label != -1) of class c."""
    sims = np.asarray(sims, np.float64)
    real = labels >= 0
    scaled = np.where(real, sims / tau, -np.inf)
    row_max = scaled.max(axis=1, keepdims=True) if scaled.shape[1] else np.full((len(sims), 1), -np.inf)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.where(real, np.exp(np.where(real, scaled - row_max, 0.0)), 0.0)
    totals = weights.sum(axis=1, keepdims=True)
    weights = np.divide(weights, totals, out=np.zeros_like(weights), where=totals > 0)
    out = np.zeros((len(sims), num_classes))
    rows, cols = np.nonzero(real)
    np.add.at(out, (rows, labels[rows, cols]), weights[rows, cols])
    return out


def fuse(p_base: np.ndarray, p_ret: np.ndarray, threshold: float, lam: float) -> np.ndarray:
    """lam * p_ret + (1 - lam) * p_base where max_c p_ret >= threshold, else p_base."""
    p_base = np.asarray(p_base, np.float64)
    p_ret = np.asarray(p_ret, np.float64)
    if p_ret.shape[1] == 0:
        return p_base.copy()
    confident = p_ret.max(axis=1, keepdims=True) >= threshold
    return np.where(confident, lam * p_ret + (1 - lam) * p_base, p_base)


def semantic_merge(class_probs: np.ndarray, mask_logits: np.ndarray) -> np.ndarray:
    """out[c, h, w] = sum_n class_probs[n, c] * sigmoid(mask_logits[n, h, w])."""
    probs = np.asarray(class_probs, np.float64)
    logits = np.asarray(mask_logits, np.float64)
    n, h, w = logits.shape
    sig = 0.5 * (1.0 + np.tanh(0.5 * logits))  # sigmoid without overflow in exp
    return (probs.T @ sig.reshape(n, h * w)).reshape(probs.shape[1], h, w)


def resample(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """out[n] = rows @ x[n] @ cols.T in float64."""
    return np.matmul(np.matmul(rows.astype(np.float64), x.astype(np.float64)), cols.astype(np.float64).T)


def panoptic_scores(scores: np.ndarray, mask_logits: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """[K, H, W] score x sigmoid(logit) in float64, sigmoid 0 where exp(-logit) overflows float32
    (as the float32 computation FC-CLIP runs gives)."""
    x = mask_logits[queries].astype(np.float64)
    with np.errstate(over="ignore"):
        sig = np.where(x < -88.72283, 0.0, 1.0 / (1.0 + np.exp(-x)))
    return scores.astype(np.float64)[:, None, None] * sig


def semantic_argmax(class_probs: np.ndarray, mask_logits: np.ndarray) -> np.ndarray:
    """argmax over classes of semantic_merge, float64."""
    return semantic_merge(class_probs, mask_logits).argmax(0)


def panoptic_owner(
    scores: np.ndarray, mask_logits: np.ndarray, queries: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(owner, own, mask_pixels) from the definition, float64."""
    owner = panoptic_scores(scores, mask_logits, queries).argmax(0)
    kept = mask_logits[queries]
    own = np.take_along_axis(kept, owner[None], 0)[0] >= 0
    return owner, own, (kept >= 0).reshape(len(queries), -1).sum(1)
