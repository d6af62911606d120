"""Results in the formats other tools read.

- **Label PNGs**: the semantic map as class ids, 8-bit where every id fits, 16-bit otherwise.
- **COCO instance results**: a JSON list of ``{"image_id", "category_id", "segmentation" (RLE),
  "score", "bbox"}``, what ``pycocotools.coco.COCO.loadRes`` and COCOeval take.
- **COCO panoptic**: per image a PNG whose RGB encodes the segment id (``id = R + 256 G + 256^2 B``,
  panopticapi's ``id2rgb``) and an annotation ``{"image_id", "file_name", "segments_info"}``.

Category ids are the database's class ids; ``categories(vocabulary)`` lists them with their names
and whether they are things.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
from PIL import Image

from knnclip.engine.database.vocabulary import ClassInfo
from knnclip.engine.errors import InvalidInputError, needs_extra
from knnclip.engine.pipeline.results import Result, bbox
from knnclip.engine.render import save_png

FORMATS = ("json", "label-png", "coco-instances", "coco-panoptic")


def rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO run-length encoding of a boolean [H, W] mask, JSON-ready (``counts`` as text)."""
    try:
        from pycocotools import mask as coco_mask
    except ImportError:
        raise needs_extra("COCO RLE masks (pycocotools)", "video") from None
    encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def label_image(labels: np.ndarray, what: str = "the label map") -> Image.Image:
    """``labels`` [H, W] non-negative ids as an 8-bit image where they all fit, else 16-bit; ids
    outside 0..65535 are refused (a PNG has at most 16 bits per sample: they would wrap silently)."""
    top = int(labels.max(initial=0))
    if labels.min(initial=0) < 0 or top > 65535:
        raise InvalidInputError(f"{what}: ids outside 0..65535 cannot be written as a label PNG (largest {top})")
    return Image.fromarray(labels.astype(np.uint8 if top <= 255 else np.uint16))


def write_label_png(labels: np.ndarray, path: str | os.PathLike[str]) -> None:
    """``labels`` [H, W] as a label PNG (:func:`label_image`), written atomically."""
    save_png(label_image(labels, str(path)), path)


def coco_instances(result: Result, image_id: int) -> list[dict[str, Any]]:
    """The COCO instance results of one image (``Result.instances``, from ``instance=True``)."""
    return [
        {
            "image_id": image_id, "category_id": i.class_id, "segmentation": rle(i.mask), "score": float(i.score),
            "bbox": bbox(i.mask),
        }
        for i in result.instances
    ]  # fmt: skip


def panoptic_rgb(panoptic: np.ndarray) -> np.ndarray:
    """Segment ids [H, W] -> uint8 [H, W, 3] with ``id = R + 256 G + 256^2 B``."""
    ids = panoptic.astype(np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def coco_panoptic(result: Result, image_id: int, file_name: str) -> tuple[np.ndarray, dict[str, Any]]:
    """(the RGB-encoded PNG pixels, the annotation with ``segments_info``) of one image."""
    segments = [
        {
            "id": s.id, "category_id": s.class_id, "iscrowd": 0, "area": s.area,
            "bbox": bbox(result.panoptic == s.id), "score": round(s.score, 6),
        }
        for s in result.segments
    ]  # fmt: skip
    return panoptic_rgb(result.panoptic), {"image_id": image_id, "file_name": file_name, "segments_info": segments}


def categories(classes: Iterable[ClassInfo]) -> list[dict[str, Any]]:
    """COCO ``categories`` of a vocabulary: id (the class id), name, and whether it is a thing."""
    return [{"id": c.id, "name": c.name, "isthing": int(bool(c.thing))} for c in sorted(classes, key=lambda c: c.id)]
