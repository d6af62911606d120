"""From model outputs to segments, as FC-CLIP's test-time inference does it, in NumPy and the
compiled ops: classification logits, geometric ensemble (with the kNN fusion
hook), mask resizing back to the image, semantic and panoptic inference.

Shapes: Q queries, C classes (void excluded), S text-classifier rows (one per synonym), E the
CLIP embedding width.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

from knnclip.engine import ops

LOG_EPS = 1e-8  # FC-CLIP: log(p + 1e-8) before semantic/panoptic inference
MAX_LOGIT_SCALE = 100.0


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """As ``F.normalize``: x / max(||x||, eps)."""
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


def classification_logits(
    embeddings: np.ndarray, classifier: np.ndarray, logit_scale: float, synonyms_per_class: Sequence[int]
) -> np.ndarray:
    """Cosine logits of ``embeddings`` [..., E] against ``classifier`` [S + 1, E] (void last),
    scaled by ``min(exp(logit_scale), 100)``, max over each class's synonyms -> [..., C + 1]."""
    scale = min(float(np.exp(logit_scale)), MAX_LOGIT_SCALE)
    logits = np.float32(scale) * (l2_normalize(embeddings) @ classifier.T)
    bounds = np.cumsum([0, *synonyms_per_class])
    per_class = np.maximum.reduceat(logits[..., :-1], bounds[:-1], axis=-1)
    return np.concatenate([per_class, logits[..., -1:]], axis=-1)


@dataclass(frozen=True)
class ClassProbabilities:
    """FC-CLIP's class distribution before it is logged: ``classes`` [Q, C] sums to 1 per query
    (the geometric ensemble); ``void`` [Q, 1] is the in-vocabulary void probability. The two
    branches it was made from are kept (``p_in``, ``p_out`` [Q, C], and the ensemble weight ``w``
    [C]), so retrieval can be fused into the out-of-vocabulary branch, as kNN-CLIP does."""

    classes: np.ndarray
    void: np.ndarray
    p_in: np.ndarray | None = None
    p_out: np.ndarray | None = None
    w: np.ndarray | None = None

    def mask_cls(self) -> np.ndarray:
        """The [Q, C + 1] log-probabilities FC-CLIP passes to semantic/panoptic inference."""
        probs = np.concatenate([self.classes * (1.0 - self.void), self.void], axis=-1)
        return np.log(probs + np.float32(LOG_EPS))


def ensemble(p_in: np.ndarray, p_out: np.ndarray, w: np.ndarray) -> np.ndarray:
    """FC-CLIP's geometric ensemble of two class distributions: ``softmax(log(p_in^(1-w) p_out^w))``."""
    with np.errstate(divide="ignore"):  # a probability that underflows to 0 gives -inf, as in torch
        logits = (1 - w) * np.log(p_in) + w * np.log(p_out)
    return softmax(logits)


def geometric_ensemble(
    in_vocab_logits: np.ndarray, out_vocab_logits: np.ndarray, seen: np.ndarray, alpha: float, beta: float
) -> ClassProbabilities:
    """FC-CLIP's ensemble of in-vocabulary and out-of-vocabulary (CLIP) classification.

    ``p = softmax(log(p_in^(1-w) p_out^w))`` with ``w = alpha`` for classes seen in training
    (``seen`` [C] true) and ``beta`` otherwise; the void probability comes from the softmax of
    the in-vocabulary logits over all C + 1 columns."""
    p_in = softmax(in_vocab_logits[..., :-1])
    p_out = softmax(out_vocab_logits[..., :-1])
    w = np.where(np.asarray(seen, dtype=bool), np.float32(alpha), np.float32(beta))
    void = softmax(in_vocab_logits)[..., -1:]
    return ClassProbabilities(ensemble(p_in, p_out, w), void, p_in, p_out, w)


FUSIONS = ("out_of_vocab", "final")


def fuse_retrieval(base: ClassProbabilities, p_ret: np.ndarray, T: float, lam: float, placement: str) -> np.ndarray:
    """[Q, C] class probabilities with retrieval fused in where ``max_c p_ret >= T``.

    ``"out_of_vocab"`` (kNN-CLIP, Fig. 4): the out-of-vocabulary distribution becomes
    ``lam * p_ret + (1 - lam) * p_out`` before FC-CLIP's ensemble ``p_in^(1-w) p_out^w``, so the
    in-vocabulary branch still weighs in. ``"final"``: ``lam * p_ret + (1 - lam) * p`` on the
    ensembled distribution ``p``."""
    if placement == "final":
        return ops.fuse(np.ascontiguousarray(base.classes, np.float32), p_ret, T, lam)
    if placement != "out_of_vocab":
        raise ValueError(f"fusion placement must be one of {FUSIONS}, got {placement!r}")
    if base.p_in is None or base.p_out is None or base.w is None:
        raise ValueError("out-of-vocabulary fusion needs the ensemble's branches (from geometric_ensemble)")
    p_out = ops.fuse(np.ascontiguousarray(base.p_out, np.float32), p_ret, T, lam)
    return ensemble(base.p_in, p_out, base.w).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _interp_matrix(out_size: int, in_size: int) -> np.ndarray:
    """[out, in] float64 matrix of 1-D linear interpolation as ``F.interpolate(mode="bilinear",
    align_corners=False)`` computes it (source index clamped at 0, edge repeated)."""
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = src - i0
    m = np.zeros((out_size, in_size))
    np.add.at(m, (np.arange(out_size), i0), 1.0 - frac)
    np.add.at(m, (np.arange(out_size), i1), frac)
    return m


@functools.lru_cache(maxsize=64)
def resize_matrices(
    mask_size: tuple[int, int], padded: tuple[int, int], resized: tuple[int, int], output: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The row and column matrices of FC-CLIP's mask resizing: upsample from the stride-4 ``mask_size``
    to the ``padded`` input, crop the ``resized`` (unpadded) image, resize to ``output``. All three
    steps are linear and separable, so they compose into ``A_y`` [H_out, h] and ``A_x`` [W_out, w]:
    ``out = A_y @ mask @ A_x.T``."""
    rows = _interp_matrix(output[0], resized[0]) @ _interp_matrix(padded[0], mask_size[0])[: resized[0]]
    cols = _interp_matrix(output[1], resized[1]) @ _interp_matrix(padded[1], mask_size[1])[: resized[1]]
    return rows.astype(np.float32), cols.astype(np.float32)


def resize_masks(
    masks: np.ndarray, padded: tuple[int, int], resized: tuple[int, int], output: tuple[int, int]
) -> np.ndarray:
    """[Q, h, w] mask logits at stride 4 -> [Q, H_out, W_out] (detectron2 ``sem_seg_postprocess``)."""
    rows, cols = resize_matrices(tuple(masks.shape[-2:]), padded, resized, output)
    # Each row of rows/cols holds a few non-zeros: the banded op costs O(taps) per output pixel
    # where two dense products would cost O(h + w).
    return ops.resample(np.ascontiguousarray(masks), rows.astype(np.float32), cols.astype(np.float32))


# Post-processing never holds more than this many bytes of image-sized mask logits at once: an
# image whose [Q, H, W] logits fit is resized whole (and the result reused by every decision on
# it, e.g. a sweep's grid points); a larger one is resized and decided in bands of rows. Peak
# memory is then this budget plus a few bytes per pixel, whatever the number of queries.
FULL_MASKS_BUDGET = int(os.environ.get("KNNCLIP_MASK_BUDGET_BYTES", 512 << 20))


class ImageMasks:
    """Stride-4 mask logits [Q, h, w] and how they map onto the image (FC-CLIP's upsample, crop
    and resize): the image-sized logits, whole when they fit :data:`FULL_MASKS_BUDGET`, else
    band by band (:meth:`bands`)."""

    def __init__(
        self, masks: np.ndarray, padded: tuple[int, int], resized: tuple[int, int], output: tuple[int, int]
    ) -> None:
        self.masks = np.ascontiguousarray(masks)
        self.rows, self.cols = resize_matrices(tuple(masks.shape[-2:]), padded, resized, output)
        self.shape = (int(masks.shape[0]), int(output[0]), int(output[1]))
        self._full: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        q, h, w = self.shape
        return q * h * w * 4

    def bands(self, budget: int | None = None) -> Iterator[tuple[slice, np.ndarray]]:
        """(rows of the image, their [Q, rows, W] logits), covering the image top to bottom."""
        budget = FULL_MASKS_BUDGET if budget is None else budget
        q, h, w = self.shape
        if self._full is not None or self.nbytes <= budget:
            if self._full is None:
                self._full = ops.resample(self.masks, self.rows, self.cols)
            yield slice(0, h), self._full
            return
        step = max(1, budget // max(1, q * w * 4))
        for top in range(0, h, step):
            rows = np.ascontiguousarray(self.rows[top : top + step])
            yield slice(top, top + len(rows)), ops.resample(self.masks, rows, self.cols)


def _bands(masks: np.ndarray | ImageMasks) -> Iterator[tuple[slice, np.ndarray]]:
    if isinstance(masks, ImageMasks):
        yield from masks.bands()
    else:
        yield slice(0, masks.shape[-2]), np.ascontiguousarray(masks, np.float32)


def _image_shape(masks: np.ndarray | ImageMasks) -> tuple[int, int]:
    return masks.shape[-2:] if isinstance(masks, np.ndarray) else masks.shape[1:]


def semantic_inference(class_probs: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """[Q, C] class probabilities, [Q, H, W] mask logits -> [C, H, W] = sum_q p[q, c] sigmoid(mask[q])."""
    return ops.semantic_merge(np.ascontiguousarray(class_probs, np.float32), np.ascontiguousarray(masks, np.float32))


def semantic_labels(class_probs: np.ndarray, masks: np.ndarray | ImageMasks) -> np.ndarray:
    """[H, W] int32 ``semantic_inference(class_probs, masks).argmax(0)``, without the [C, H, W]
    scores; ``masks`` image-sized logits [Q, H, W] or :class:`ImageMasks` (decided band by band)."""
    probs = np.ascontiguousarray(class_probs, np.float32)
    labels = np.empty(_image_shape(masks), np.int32)
    for rows, band in _bands(masks):
        labels[rows] = ops.semantic_argmax(probs, band)
    return labels


def semantic_probs(mask_cls: np.ndarray) -> np.ndarray:
    """The per-query class weights of FC-CLIP's semantic inference: softmax(mask_cls)[:, :C]."""
    return softmax(mask_cls)[:, :-1]


@dataclass(frozen=True)
class Segment:
    """One panoptic segment: ``id`` in the segment map (1..), its class index, its score (the
    class probability of the query that made it; the first query for merged stuff), its area in
    pixels, whether the class is a thing, and the query index."""

    id: int
    category_id: int
    score: float
    area: int
    isthing: bool
    query: int


def panoptic_inference(
    mask_cls: np.ndarray,
    masks: np.ndarray | ImageMasks,
    is_thing: Callable[[int], bool] | Sequence[bool],
    object_mask_threshold: float = 0.0,
    overlap_threshold: float = 0.8,
) -> tuple[np.ndarray, list[Segment]]:
    """Mask2Former's panoptic inference, as FC-CLIP runs it -> (segment ids [H, W] int32, 0 = void; segments).

    Queries whose best class is void, or whose score is not above ``object_mask_threshold``, are
    dropped; each pixel goes to the query with the highest score x sigmoid(mask); a query keeps the
    pixels it won where its own mask is >= 0.5 if at least ``overlap_threshold`` of its mask
    survived; stuff classes merge into one segment per class. ``masks``: image-sized logits
    [Q, H, W], or :class:`ImageMasks` (assigned band by band)."""
    thing = is_thing if callable(is_thing) else (lambda c: bool(is_thing[c]))
    num_classes = mask_cls.shape[-1] - 1
    probs = softmax(mask_cls)
    labels = probs.argmax(-1)
    scores = probs[np.arange(len(probs)), labels]
    keep = np.flatnonzero((labels != num_classes) & (scores > object_mask_threshold))
    height, width = _image_shape(masks)
    segments: list[Segment] = []
    if len(keep) == 0:
        return np.zeros((height, width), dtype=np.int32), segments
    # Each pixel goes to the query with the highest score x sigmoid(mask), and is the query's own
    # where that mask's logit is >= 0 (sigmoid >= 0.5); one pass of the compiled op per band.
    owner = np.empty((height, width), np.int32)
    own_at_owner = np.empty((height, width), bool)
    original = np.zeros(len(keep), np.int64)  # pixels of each kept query's own mask
    kept_scores, kept = scores[keep].astype(np.float32), keep.astype(np.int64)
    for rows, band in _bands(masks):
        owner[rows], own_at_owner[rows], band_pixels = ops.panoptic_owner(kept_scores, band, kept)
        original += band_pixels
    owner, own_at_owner = owner.ravel(), own_at_owner.ravel()
    area = np.bincount(owner, minlength=len(keep))  # pixels each query won
    region = np.bincount(owner, weights=own_at_owner, minlength=len(keep)).astype(np.int64)  # won and own
    segment_of = np.zeros(len(keep) + 1, np.int32)  # kept query -> segment id (0: dropped)
    stuff: dict[int, int] = {}  # class -> index into segments
    for k, query in enumerate(keep):
        if area[k] == 0 or original[k] == 0 or region[k] == 0 or area[k] / original[k] < overlap_threshold:
            continue
        cls = int(labels[query])
        isthing = thing(cls)
        if not isthing and cls in stuff:  # stuff: one segment per class
            i = stuff[cls]
            segment_of[k] = segments[i].id
            segments[i] = replace(segments[i], area=segments[i].area + int(region[k]))
            continue
        if not isthing:
            stuff[cls] = len(segments)
        segments.append(Segment(len(segments) + 1, cls, float(scores[query]), int(region[k]), isthing, int(query)))
        segment_of[k] = segments[-1].id
    panoptic = np.where(own_at_owner, segment_of[owner], 0).astype(np.int32)
    return panoptic.reshape(height, width), segments


@dataclass(frozen=True)
class Instance:
    """One instance of FC-CLIP's instance inference: class index, score (class probability x the
    mean mask probability inside the mask), query index, and the binary mask at the image's size."""

    category_id: int
    score: float
    query: int
    mask: np.ndarray


def instance_inference(
    mask_cls: np.ndarray,
    masks: np.ndarray | ImageMasks,
    is_thing: Callable[[int], bool] | Sequence[bool],
    topk: int = 100,
) -> list[Instance]:
    """Mask2Former's instance inference, as FC-CLIP runs it, best first.

    The ``topk`` (query, class) pairs by class probability (void excluded) over all queries;
    those of thing classes kept (FC-CLIP's panoptic evaluation restricts instances to things); the
    mask is the query's logits > 0 and the score the class probability times the mean sigmoid of
    the logits inside that mask. ``masks``: image-sized logits [Q, H, W] or :class:`ImageMasks`."""
    thing = is_thing if callable(is_thing) else (lambda c: bool(is_thing[c]))
    probs = softmax(mask_cls)[:, :-1]
    q, c = probs.shape
    flat = probs.reshape(-1)
    k = min(topk, flat.size)
    if k == 0:
        return []
    # the top k by value; which of equal values make the cut is the one point torch leaves open
    top = np.argpartition(-flat, k - 1)[:k] if k < flat.size else np.arange(flat.size)
    pairs = [(int(i) // c, int(i) % c, float(flat[i])) for i in top if thing(int(i) % c)]
    queries = sorted({query for query, _, _ in pairs})
    if not queries:
        return []
    h, w = _image_shape(masks)
    binary = np.zeros((len(queries), h, w), bool)
    prob_sum = np.zeros(len(queries), np.float64)
    rows_of = np.asarray(queries, np.int64)
    for rows, band in _bands(masks):
        logits = band[rows_of]
        inside = logits > 0
        binary[:, rows] = inside
        prob_sum += np.where(inside, 1.0 / (1.0 + np.exp(-logits.astype(np.float64))), 0.0).sum(axis=(1, 2))
    area = binary.reshape(len(queries), -1).sum(axis=1)
    mask_score = prob_sum / (area + 1e-6)
    slot = {query: i for i, query in enumerate(queries)}
    found = [
        Instance(cls, score * float(mask_score[slot[query]]), query, binary[slot[query]]) for query, cls, score in pairs
    ]
    return sorted(found, key=lambda inst: -inst.score)
