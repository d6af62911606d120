"""The segmenter measured on a dataset: mIoU and pixel accuracy (semantic), PQ/SQ/RQ (panoptic),
and building a database from a dataset's training split.

The segmenter's vocabulary is its database's; ``register_classes`` puts a dataset's classes (with
their synonyms and thing flags) there, and ``class_lut`` maps the database's class ids back to
the dataset's class indices, so predictions and ground truth meet in the dataset's numbering.
A prediction of a database class the dataset does not have counts as wrong (semantic) or is left
out (panoptic: no category to charge it to).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from knnclip.engine.eval.datasets import Dataset, DatasetClass
from knnclip.engine.eval.metrics import ConfusionMatrix, PanopticQuality

if TYPE_CHECKING:  # imported for its type only: the segmenter imports much of the engine
    from knnclip.engine.pipeline.results import Result
    from knnclip.engine.pipeline.segmenter import Segmenter

log = logging.getLogger("knnclip.evaluation")

Progress = Callable[[int, int], None]  # (done, total)


def register_classes(seg: Segmenter, classes: Sequence[DatasetClass], which: Collection[int] | None = None) -> int:
    """Add the dataset's classes (all, or the indices in ``which``) that the vocabulary lacks;
    returns how many were added."""
    added = 0
    for index, c in enumerate(classes):
        if which is not None and index not in which:
            continue
        if seg.db.vocabulary.find(c.name) is None:
            seg.add_class(c.name, c.synonyms, thing=c.thing)
            added += 1
    return added


def class_lut(seg: Segmenter, classes: Sequence[DatasetClass]) -> np.ndarray:
    """Database class id -> dataset class index (-1 for classes the dataset lacks)."""
    vocab = seg.db.vocabulary
    size = max(vocab, default=-1) + 1
    lut = np.full(size + 1, -1, np.int64)  # one spare slot so that an empty vocabulary still indexes
    for index, c in enumerate(classes):
        info = vocab.find(c.name)
        if info is not None:
            lut[info.id] = index
    return lut


def add_dataset(
    seg: Segmenter,
    ds: Dataset,
    *,
    classes: Collection[int] | None = None,
    batch: int = 16,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Add the ground-truth masks of ``ds`` (of the class indices in ``classes``, or all) to the
    database in one pass: the class regions of a semantic dataset, the non-crowd segments of a
    panoptic one. Returns counts and seconds."""
    start = time.perf_counter()
    register_classes(seg, ds.classes, classes)
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    labels: list[list[str]] = []
    added = offered = used = 0

    def flush() -> None:
        nonlocal added
        if images:
            added += len(seg.add_examples(images, masks, labels))
            images.clear()
            masks.clear()
            labels.clear()

    for i in range(len(ds)):
        image_masks, image_classes = ds.masks(i)
        keep = [k for k, c in enumerate(image_classes) if classes is None or c in classes]
        if keep:
            images.append(ds.image(i))
            masks.append(image_masks[keep])
            labels.append([ds.classes[image_classes[k]].name for k in keep])
            offered += len(keep)
            used += 1
        if len(images) >= batch:
            flush()
        if progress is not None:
            progress(i + 1, len(ds))
    flush()
    return {
        "images": used,
        "masks": offered,
        "entries": added,
        "skipped_masks": offered - added,
        "seconds": time.perf_counter() - start,
    }


@dataclass
class Evaluation:
    """What one pass over a dataset measured."""

    confusion: ConfusionMatrix
    panoptic: PanopticQuality | None = None
    images: int = 0
    seconds: float = 0.0
    timings_ms: dict[str, list[float]] = field(default_factory=dict)


def _restricted(labels: np.ndarray, keep: np.ndarray | None, ignore: int) -> np.ndarray:
    """Ground truth with the classes outside ``keep`` (bool per class) turned to ``ignore``."""
    if keep is None:
        return labels
    valid = labels != ignore
    return np.where(valid & keep[np.where(valid, labels, 0)], labels, ignore)


def evaluate(
    seg: Segmenter,
    ds: Dataset,
    *,
    restrict: Collection[int] | None = None,
    panoptic: bool | None = None,
    progress: Progress | None = None,
    on_result: Callable[[int, Result], None] | None = None,
) -> Evaluation:
    """Segment every image of ``ds`` and accumulate mIoU (and PQ for a panoptic dataset, unless
    ``panoptic=False``). With ``restrict``, ground truth of the other class indices is ignored
    (the continual protocol's "classes seen so far"). ``on_result(i, result)`` sees each image's
    result (the demo draws its overlays from them)."""
    start = time.perf_counter()
    n = len(ds.classes)
    keep = None if restrict is None else np.isin(np.arange(n), list(restrict))
    do_panoptic = ds.panoptic if panoptic is None else panoptic and ds.panoptic
    result = Evaluation(ConfusionMatrix(n, ds.ignore))
    if do_panoptic:
        result.panoptic = PanopticQuality(n, [c.thing for c in ds.classes])
    lut = class_lut(seg, ds.classes)
    for i in range(len(ds)):
        r = seg.segment(ds.image(i), name=ds.names[i], panoptic=result.panoptic is not None)
        if len(lut) <= max(r.classes, default=0):  # the vocabulary grew meanwhile
            lut = class_lut(seg, ds.classes)
        gt = _restricted(ds.semantic(i), keep, ds.ignore)
        result.confusion.update(lut[r.semantic], gt)
        if result.panoptic is not None:
            _update_panoptic(result.panoptic, r, lut, ds, i, keep)
        for stage, ms in r.timings.items():
            result.timings_ms.setdefault(stage, []).append(ms)
        if on_result is not None:
            on_result(i, r)
        if progress is not None:
            progress(i + 1, len(ds))
    result.images = len(ds)
    result.seconds = time.perf_counter() - start
    return result


def _update_panoptic(metric: PanopticQuality, r: Any, lut: np.ndarray, ds: Dataset, i: int, keep) -> None:
    ids, info = cast(Any, ds).segments(i)  # a panoptic dataset (has_panoptic)
    if keep is not None:  # segments of classes outside the restriction become void
        gone = [sid for sid, (c, _) in info.items() if not keep[c]]
        if gone:
            ids = np.where(np.isin(ids, gone), 0, ids)
            info = {sid: v for sid, v in info.items() if keep[v[0]]}
    pred_segments = {s.id: int(lut[s.class_id]) for s in r.segments}
    outside = [sid for sid, c in pred_segments.items() if c < 0]
    pred = r.panoptic
    if outside:
        log.debug("%s: %d segments of classes the dataset lacks left out", ds.names[i], len(outside))
        pred = np.where(np.isin(pred, outside), 0, pred)
        pred_segments = {k: v for k, v in pred_segments.items() if v >= 0}
    metric.update(pred, pred_segments, ids, info)


def semantic_summary(evaluation: Evaluation, classes: Sequence[DatasetClass]) -> dict[str, Any]:
    """JSON-ready: mIoU, pixel accuracy, IoU per class, the most confused pairs, timing."""
    cm = evaluation.confusion
    iou = cm.iou()
    out: dict[str, Any] = {
        "miou": json_score(cm.miou()),
        "pixel_accuracy": json_score(cm.pixel_accuracy()),
        "classes_scored": int(np.isfinite(iou).sum()),
        "iou": {c.name: json_score(v) for c, v in zip(classes, iou, strict=True)},
        "most_confused": [
            {"true": classes[t].name, "predicted": classes[p].name, "pixels": n} for t, p, n in cm.most_confused(10)
        ],
        "images": evaluation.images,
        "seconds": round(evaluation.seconds, 3),
        "latency_ms_median": {k: round(float(np.median(v)), 3) for k, v in evaluation.timings_ms.items()},
    }
    if evaluation.panoptic is not None:
        out["panoptic"] = {
            group: {k: json_score(v) if k != "n" else v for k, v in values.items()}
            for group, values in evaluation.panoptic.summary().items()
        }
    return out


def json_score(value: float) -> float | None:
    """A score for a JSON report: rounded to 6 places, None where it is undefined (NaN)."""
    return None if not np.isfinite(value) else round(float(value), 6)
