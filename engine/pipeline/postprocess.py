"""From model outputs to segments, as FC-CLIP's test-time inference does it, on host or device
arrays alike (:mod:`knnclip.engine.pipeline.arrays`: every function takes ``xp``, NumPy by
default) and the compiled ops: classification logits, geometric ensemble (with the kNN fusion
hook), mask resizing back to the image, semantic, panoptic and instance inference.

On a device, everything image-sized stays there: the host receives per-query vectors for the
segment table's bookkeeping (``segments``) and the label maps and instance masks (``result``).

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
from knnclip.engine.config import FUSIONS
from knnclip.engine.pipeline.arrays import HOST, Array, ArrayModule

LOG_EPS = 1e-8  # FC-CLIP: log(p + 1e-8) before semantic/panoptic inference
MAX_LOGIT_SCALE = 100.0


def softmax(x: Array, axis: int = -1, *, xp: ArrayModule = HOST) -> Array:
    return xp.softmax(x, axis)


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12, *, xp: ArrayModule = HOST) -> Array:
    """As ``F.normalize``: x / max(||x||, eps)."""
    return x / xp.maximum(xp.norm(x, axis=axis), eps)


@functools.lru_cache(maxsize=64)
def synonym_columns(synonyms_per_class: tuple[int, ...]) -> np.ndarray:
    """[C, max synonyms] int64 columns of each class's synonyms in the classifier's rows, a short
    class padded with its first column again (which leaves its maximum unchanged)."""
    starts = np.cumsum([0, *synonyms_per_class])[:-1]
    widest = max(synonyms_per_class, default=1)
    offsets = np.arange(widest)[None, :]
    counts = np.asarray(synonyms_per_class)[:, None]
    return (starts[:, None] + np.where(offsets < counts, offsets, 0)).astype(np.int64)


def classification_logits(
    embeddings: Array,
    classifier: Array,
    logit_scale: float,
    synonyms_per_class: Sequence[int],
    *,
    xp: ArrayModule = HOST,
) -> Array:
    """Cosine logits of ``embeddings`` [..., E] against ``classifier`` [S + 1, E] (void last),
    scaled by ``min(exp(logit_scale), 100)``, max over each class's synonyms -> [..., C + 1]."""
    scale = min(float(np.exp(logit_scale)), MAX_LOGIT_SCALE)
    logits = (l2_normalize(embeddings, xp=xp) @ xp.transpose(classifier)) * float(np.float32(scale))
    per_class = tuple(int(n) for n in synonyms_per_class)
    if max(per_class, default=1) == 1:  # one synonym each: the rows are the classes
        return logits
    columns = xp.constant(("synonym_columns", per_class), lambda: synonym_columns(per_class))
    grouped = xp.take(logits, columns, axis=-1)  # [..., C, max synonyms]
    return xp.concatenate([xp.amax(grouped, axis=-1), logits[..., -1:]], axis=-1)


@dataclass(frozen=True)
class ClassProbabilities:
    """FC-CLIP's class distribution before it is logged: ``classes`` [Q, C] sums to 1 per query
    (the geometric ensemble); ``void`` [Q, 1] is the in-vocabulary void probability. The two
    branches it was made from are kept (``p_in``, ``p_out`` [Q, C], and the ensemble weight ``w``
    [C]), so retrieval can be fused into the out-of-vocabulary branch, as kNN-CLIP does."""

    classes: Array
    void: Array
    p_in: Array | None = None
    p_out: Array | None = None
    w: Array | None = None

    def mask_cls(self, xp: ArrayModule = HOST) -> Array:
        """The [Q, C + 1] log-probabilities FC-CLIP passes to semantic/panoptic inference."""
        probs = xp.concatenate([self.classes * (1.0 - self.void), self.void], axis=-1)
        return xp.log(probs + LOG_EPS)


def ensemble(p_in: Array, p_out: Array, w: Array, *, xp: ArrayModule = HOST) -> Array:
    """FC-CLIP's geometric ensemble of two class distributions: ``softmax(log(p_in^(1-w) p_out^w))``."""
    # a probability that underflows to 0 gives -inf, as in torch
    logits = (1 - w) * xp.log(p_in) + w * xp.log(p_out)
    return xp.softmax(logits)


def ensemble_weights(seen: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """[C] float32: ``alpha`` for the classes FC-CLIP saw in training, ``beta`` for the others."""
    return np.where(np.asarray(seen, dtype=bool), np.float32(alpha), np.float32(beta))


def geometric_ensemble(
    in_vocab_logits: Array,
    out_vocab_logits: Array,
    seen: np.ndarray | Array,
    alpha: float,
    beta: float,
    *,
    xp: ArrayModule = HOST,
    weights: Array | None = None,
) -> ClassProbabilities:
    """FC-CLIP's ensemble of in-vocabulary and out-of-vocabulary (CLIP) classification.

    ``p = softmax(log(p_in^(1-w) p_out^w))`` with ``w = alpha`` for classes seen in training
    (``seen`` [C] true) and ``beta`` otherwise; the void probability comes from the softmax of
    the in-vocabulary logits over all C + 1 columns. ``weights``: ``w`` already on ``xp``'s
    device (:func:`ensemble_weights`), which then ignores ``seen``, ``alpha`` and ``beta``."""
    p_in = xp.softmax(in_vocab_logits[..., :-1])
    p_out = xp.softmax(out_vocab_logits[..., :-1])
    w = weights if weights is not None else xp.upload(ensemble_weights(seen, alpha, beta), "constant")
    void = xp.softmax(in_vocab_logits)[..., -1:]
    return ClassProbabilities(ensemble(p_in, p_out, w, xp=xp), void, p_in, p_out, w)


def fuse_retrieval(
    base: ClassProbabilities, p_ret: Array, T: float, lam: float, placement: str, *, xp: ArrayModule = HOST
) -> Array:
    """[Q, C] class probabilities with retrieval fused in where ``max_c p_ret >= T``.

    ``"out_of_vocab"`` (kNN-CLIP, Fig. 4): the out-of-vocabulary distribution becomes
    ``lam * p_ret + (1 - lam) * p_out`` before FC-CLIP's ensemble ``p_in^(1-w) p_out^w``, so the
    in-vocabulary branch still weighs in. ``"final"``: ``lam * p_ret + (1 - lam) * p`` on the
    ensembled distribution ``p``."""
    if placement == "final":
        return xp.fuse(xp.contiguous(xp.astype(base.classes, "float32")), p_ret, T, lam)
    if placement != "out_of_vocab":
        raise ValueError(f"fusion placement must be one of {FUSIONS}, got {placement!r}")
    if base.p_in is None or base.p_out is None or base.w is None:
        raise ValueError("out-of-vocabulary fusion needs the ensemble's branches (from geometric_ensemble)")
    p_out = xp.fuse(xp.contiguous(xp.astype(base.p_out, "float32")), p_ret, T, lam)
    return xp.astype(ensemble(base.p_in, p_out, base.w, xp=xp), "float32")


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
    band by band (:meth:`bands`). The logits stay where ``xp`` keeps them; the resize matrices
    go there once per image size."""

    def __init__(
        self,
        masks: Array,
        padded: tuple[int, int],
        resized: tuple[int, int],
        output: tuple[int, int],
        *,
        xp: ArrayModule = HOST,
    ) -> None:
        self.xp = xp
        self.masks = xp.contiguous(masks)
        key = (tuple(int(n) for n in masks.shape[-2:]), tuple(padded), tuple(resized), tuple(output))
        self.rows = xp.constant(("resize_rows", *key), lambda: resize_matrices(*key)[0])
        self.cols = xp.constant(("resize_cols", *key), lambda: resize_matrices(*key)[1])
        self.shape = (int(masks.shape[0]), int(output[0]), int(output[1]))
        self._full: Array | None = None

    @property
    def nbytes(self) -> int:
        q, h, w = self.shape
        return q * h * w * 4

    def bands(self, budget: int | None = None) -> Iterator[tuple[slice, Array]]:
        """(rows of the image, their [Q, rows, W] logits), covering the image top to bottom."""
        budget = FULL_MASKS_BUDGET if budget is None else budget
        q, h, w = self.shape
        if self._full is not None or self.nbytes <= budget:
            if self._full is None:
                self._full = self.xp.resample(self.masks, self.rows, self.cols)
            yield slice(0, h), self._full
            return
        step = max(1, budget // max(1, q * w * 4))
        for top in range(0, h, step):
            rows = self.xp.contiguous(self.rows[top : top + step])
            yield slice(top, top + int(rows.shape[0])), self.xp.resample(self.masks, rows, self.cols)


def _bands(masks: Array | ImageMasks, xp: ArrayModule) -> Iterator[tuple[slice, Array]]:
    if isinstance(masks, ImageMasks):
        yield from masks.bands()
    else:
        yield slice(0, masks.shape[-2]), xp.contiguous(xp.astype(masks, "float32"))


def _image_shape(masks: Array | ImageMasks) -> tuple[int, int]:
    shape = masks.shape[1:] if isinstance(masks, ImageMasks) else masks.shape[-2:]
    return int(shape[0]), int(shape[1])


def semantic_inference(class_probs: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """[Q, C] class probabilities, [Q, H, W] mask logits -> [C, H, W] = sum_q p[q, c] sigmoid(mask[q])."""
    return ops.semantic_merge(np.ascontiguousarray(class_probs, np.float32), np.ascontiguousarray(masks, np.float32))


def semantic_labels(class_probs: Array, masks: Array | ImageMasks, *, xp: ArrayModule = HOST) -> Array:
    """[H, W] int32 ``semantic_inference(class_probs, masks).argmax(0)``, without the [C, H, W]
    scores; ``masks`` image-sized logits [Q, H, W] or :class:`ImageMasks` (decided band by band)."""
    probs = xp.contiguous(xp.astype(class_probs, "float32"))
    labels = xp.empty(_image_shape(masks), "int32")
    for rows, band in _bands(masks, xp):
        labels[rows] = xp.semantic_argmax(probs, band)
    return labels


def semantic_probs(mask_cls: Array, *, xp: ArrayModule = HOST) -> Array:
    """The per-query class weights of FC-CLIP's semantic inference: softmax(mask_cls)[:, :C]."""
    return xp.softmax(mask_cls)[:, :-1]


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


def _thing_test(is_thing: Callable[[int], bool] | Sequence[bool]) -> Callable[[int], bool]:
    return is_thing if callable(is_thing) else (lambda c: bool(is_thing[c]))


def panoptic_inference(
    mask_cls: Array,
    masks: Array | ImageMasks,
    is_thing: Callable[[int], bool] | Sequence[bool],
    object_mask_threshold: float = 0.0,
    overlap_threshold: float = 0.8,
    *,
    xp: ArrayModule = HOST,
) -> tuple[Array, list[Segment]]:
    """Mask2Former's panoptic inference, as FC-CLIP runs it -> (segment ids [H, W] int32, 0 = void; segments).

    Queries whose best class is void, or whose score is not above ``object_mask_threshold``, are
    dropped; each pixel goes to the query with the highest score x sigmoid(mask); a query keeps the
    pixels it won where its own mask is >= 0.5 if at least ``overlap_threshold`` of its mask
    survived; stuff classes merge into one segment per class. ``masks``: image-sized logits
    [Q, H, W], or :class:`ImageMasks` (assigned band by band). The segment map stays on ``xp``'s
    device; the segment table is decided on the host from per-query counts."""
    thing = _thing_test(is_thing)
    num_classes = mask_cls.shape[-1] - 1
    probs = xp.softmax(mask_cls)
    best = xp.argmax(probs, axis=-1)
    best_scores = xp.take_along(probs, best[:, None], axis=-1)[:, 0]
    labels, scores = xp.to_host(best, "segments"), xp.to_host(best_scores, "segments")
    keep = np.flatnonzero((labels != num_classes) & (scores > object_mask_threshold))
    height, width = _image_shape(masks)
    segments: list[Segment] = []
    if len(keep) == 0:
        return xp.zeros((height, width), "int32"), segments
    # Each pixel goes to the query with the highest score x sigmoid(mask), and is the query's own
    # where that mask's logit is >= 0 (sigmoid >= 0.5); one pass of the compiled op per band.
    owner = xp.empty((height, width), "int32")
    own_at_owner = xp.empty((height, width), "bool")
    kept_scores = xp.upload(scores[keep].astype(np.float32), "segments")
    kept = xp.upload(keep.astype(np.int64), "segments")
    band_counts = []  # pixels of each kept query's own mask, per band
    for rows, band in _bands(masks, xp):
        owner[rows], own_at_owner[rows], band_pixels = xp.panoptic_owner(kept_scores, band, kept)
        band_counts.append(band_pixels)
    original = xp.to_host(xp.sum(xp.concatenate([c[None] for c in band_counts]), axis=0), "segments")
    area = xp.to_host(xp.bincount(owner, minlength=len(keep)), "segments")  # pixels each query won
    region = xp.to_host(xp.bincount(owner, minlength=len(keep), weights=own_at_owner), "segments")
    region = region.astype(np.int64)  # won and own
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
    ids = xp.take(xp.upload(segment_of, "segments"), owner)
    panoptic = xp.where(own_at_owner, ids, xp.zeros((), "int32"))
    return xp.astype(panoptic, "int32"), segments


@dataclass(frozen=True)
class Instance:
    """One instance of FC-CLIP's instance inference: class index, score (class probability x the
    mean mask probability inside the mask), query index, and the binary mask at the image's size."""

    category_id: int
    score: float
    query: int
    mask: np.ndarray


def instance_inference(
    mask_cls: Array,
    masks: Array | ImageMasks,
    is_thing: Callable[[int], bool] | Sequence[bool],
    topk: int = 100,
    *,
    xp: ArrayModule = HOST,
) -> list[Instance]:
    """Mask2Former's instance inference, as FC-CLIP runs it, best first.

    The ``topk`` (query, class) pairs by class probability (void excluded) over all queries;
    those of thing classes kept (FC-CLIP's panoptic evaluation restricts instances to things); the
    mask is the query's logits > 0 and the score the class probability times the mean sigmoid of
    the logits inside that mask. ``masks``: image-sized logits [Q, H, W] or :class:`ImageMasks`.
    The masks come to the host (they are the result); the rest of the work stays on ``xp``'s."""
    thing = _thing_test(is_thing)
    probs = xp.softmax(mask_cls)[:, :-1]
    q, c = (int(n) for n in probs.shape)
    k = min(topk, q * c)
    if k == 0:
        return []
    # the top k by value; which of equal values make the cut is the one point torch leaves open
    values, top = xp.topk(xp.contiguous(probs).reshape(-1), k)
    values, top = xp.to_host(values, "segments"), xp.to_host(top, "segments")
    pairs = [(int(i) // c, int(i) % c, float(v)) for i, v in zip(top, values, strict=True) if thing(int(i) % c)]
    queries = sorted({query for query, _, _ in pairs})
    if not queries:
        return []
    h, w = _image_shape(masks)
    binary = xp.zeros((len(queries), h, w), "bool")
    prob_sum = xp.zeros((len(queries),), "float64")
    rows_of = xp.upload(np.asarray(queries, np.int64), "segments")
    for rows, band in _bands(masks, xp):
        logits = xp.astype(xp.take(band, rows_of, axis=0), "float64")
        inside = logits > 0
        binary[:, rows] = inside
        prob_sum = prob_sum + xp.sum(xp.where(inside, 1.0 / (1.0 + xp.exp(-logits)), 0.0), axis=(1, 2))
    area = xp.to_host(xp.sum(xp.astype(binary, "int64"), axis=(1, 2)), "segments")
    mask_score = xp.to_host(prob_sum, "segments") / (area + 1e-6)
    binary_host = xp.to_host(binary, "result")
    slot = {query: i for i, query in enumerate(queries)}
    found = [
        Instance(cls, score * float(mask_score[slot[query]]), query, binary_host[slot[query]])
        for query, cls, score in pairs
    ]
    return sorted(found, key=lambda inst: -inst.score)
