"""Instance segmentation quality: mask AP by pycocotools' ``COCOeval`` (``iouType="segm"``), as
FC-CLIP's papers report it, on the same dataset readers as mIoU and PQ.

Ground truth is every thing segment of a panoptic dataset (a crowd segment as COCO's ``iscrowd``
region, which a detection may cover without being a false positive); predictions are the
segmenter's instance inference (``instance=True``), each instance's database class mapped to
the dataset's. COCO category ids are the dataset's class indices plus one.
"""

from __future__ import annotations

import contextlib
import io
from typing import TYPE_CHECKING, Any

from knnclip.engine.errors import InvalidInputError, needs_extra
from knnclip.engine.eval.datasets import Dataset
from knnclip.engine.eval.evaluate import Progress, class_lut
from knnclip.engine.formats import rle
from knnclip.engine.pipeline.results import bbox

if TYPE_CHECKING:  # imported for its type only: the segmenter imports much of the engine
    from knnclip.engine.pipeline.segmenter import Segmenter

# COCOeval.stats' first six, in its order: AP at IoU .50:.95, at .50, at .75, small, medium, large.
AP_NAMES = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")


def ground_truth(ds: Dataset) -> dict[str, Any]:
    """The COCO ground truth (``images``, ``annotations``, ``categories``) of a panoptic dataset's
    thing segments."""
    if not ds.panoptic:
        raise InvalidInputError(f"instance evaluation needs a panoptic dataset (segments); {ds.key} has none")
    things = [i for i, c in enumerate(ds.classes) if c.thing]
    if not things:
        raise InvalidInputError(f"{ds.key} names no thing class: there are no instances to evaluate")
    coco: dict[str, Any] = {"images": [], "annotations": [], "categories": []}
    coco["categories"] = [{"id": i + 1, "name": ds.classes[i].name} for i in things]
    for i in range(len(ds)):
        ids, info = ds.segments(i)  # type: ignore[attr-defined]  # a panoptic dataset's
        h, w = ids.shape
        coco["images"].append({"id": i + 1, "height": int(h), "width": int(w), "file_name": ds.names[i]})
        for segment_id, (index, crowd) in sorted(info.items()):
            mask = ids == segment_id
            if not ds.classes[index].thing or not mask.any():
                continue
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": i + 1,
                    "category_id": index + 1,
                    "segmentation": rle(mask),
                    "area": int(mask.sum()),
                    "bbox": bbox(mask),
                    "iscrowd": int(crowd),
                }
            )
    return coco


def detections(seg: Segmenter, ds: Dataset, progress: Progress | None = None) -> list[dict[str, Any]]:
    """The segmenter's instances on every image of ``ds`` as COCO results, in the dataset's
    categories (instances of classes the dataset lacks, or of its stuff, are left out)."""
    out: list[dict[str, Any]] = []
    lut = class_lut(seg, ds.classes)
    for i in range(len(ds)):
        result = seg.segment(ds.image(i), name=ds.names[i], instance=True)
        if len(lut) <= max(result.classes, default=0):  # the vocabulary grew meanwhile
            lut = class_lut(seg, ds.classes)
        for inst in result.instances:
            index = int(lut[inst.class_id]) if 0 <= inst.class_id < len(lut) else -1
            if index < 0 or not ds.classes[index].thing:
                continue
            out.append(
                {
                    "image_id": i + 1,
                    "category_id": index + 1,
                    "segmentation": rle(inst.mask),
                    "score": float(inst.score),
                }
            )
        if progress is not None:
            progress(i + 1, len(ds))
    return out


def mask_ap(truth: dict[str, Any], found: list[dict[str, Any]]) -> dict[str, float]:
    """COCOeval's segm AP of ``found`` against ``truth`` (fractions; -1 where COCO has no value)."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise needs_extra("instance evaluation (pycocotools)", "video") from None
    with contextlib.redirect_stdout(io.StringIO()):  # COCO prints its progress and summary
        gt = COCO()
        gt.dataset = truth
        gt.createIndex()
        if not found:  # COCO cannot load an empty result list: no detection scores nothing
            return dict.fromkeys(AP_NAMES, 0.0 if truth["annotations"] else -1.0)
        evaluation = COCOeval(gt, gt.loadRes(found), iouType="segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {name: float(value) for name, value in zip(AP_NAMES, evaluation.stats, strict=False)}


def evaluate_instances(seg: Segmenter, ds: Dataset, progress: Progress | None = None) -> dict[str, Any]:
    """Mask AP of the segmenter's instance inference on ``ds``, with the counts behind it."""
    truth = ground_truth(ds)
    found = detections(seg, ds, progress)
    return {
        **mask_ap(truth, found),
        "images": len(ds),
        "instances": len(truth["annotations"]),
        "detections": len(found),
        "categories": len(truth["categories"]),
    }
