"""Tiny datasets in the real on-disk layouts, written from the layouts' descriptions (the
detectron2 / FC-CLIP preparation scripts' outputs), not from knnclip's readers.

Pixels come from ``knnclip.engine.demo.synthetic`` (objects of 8 classes on textured backgrounds).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from knnclip.engine.demo.synthetic import CLASSES, IGNORE, Sample, make_split

CLASS_LINES = ["sky,skies", "grass,lawn", "sand", "water,sea water", "ball", "box,crate", "tree,trees", "star"]


def class_file(path: Path, first_invalid: bool = True) -> Path:
    lines = ["0:invalid_class_id"] if first_invalid else []
    offset = 1 if first_invalid else 0
    lines += [f"{i + offset}:{names}" for i, names in enumerate(CLASS_LINES)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def samples(n_train: int, n_val: int, size=(96, 128), seed: int = 0) -> dict[str, list[Sample]]:
    return {"train": make_split(n_train, seed, size), "val": make_split(n_val, seed + 1, size)}


def _save_jpg(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=95)


def _save_label(labels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".tif":
        Image.fromarray(labels.astype(np.uint16)).save(path)
    else:
        Image.fromarray(labels.astype(np.uint8)).save(path)


SEMANTIC_PATHS = {  # key -> (dataset folder, image folder, annotation folder, extension, ignore, class file)
    "ade20k-150": (
        "ADEChallengeData2016",
        "images/{long}",
        "annotations_detectron2/{long}",
        ".png",
        255,
        "ade20k_150_with_prompt_eng.txt",
    ),
    "ade20k-847": (
        "ADE20K_2021_17_01",
        "images_detectron2/{long}",
        "annotations_detectron2/{long}",
        ".tif",
        65535,
        "ade20k_847_with_prompt_eng.txt",
    ),
    "pc-59": (
        "pascal_ctx_d2",
        "images/{long}",
        "annotations_ctx59/{long}",
        ".png",
        255,
        "pascal_ctx_59_with_prompt_eng.txt",
    ),
    "pc-459": (
        "pascal_ctx_d2",
        "images/{long}",
        "annotations_ctx459/{long}",
        ".tif",
        65535,
        "pascal_ctx_459_with_prompt_eng.txt",
    ),
    "voc-21": (
        "pascal_voc_d2",
        "images/{long}",
        "annotations_pascal21/{long}",
        ".png",
        255,
        "pascal_voc_21_with_prompt_eng.txt",
    ),
}


def write_semantic(root: Path, key: str, splits: dict[str, list[Sample]], raw_ade: bool = False) -> Path:
    """Write ``splits`` as dataset ``key`` under ``root``; returns the dataset's folder. With
    ``raw_ade`` (ade20k-150 only) the labels go to ADE20K's own annotations/ folder, 0 = unlabelled."""
    folder, images, annotations, ext, ignore, names = SEMANTIC_PATHS[key]
    base = root / folder
    class_file(base / names, first_invalid=key != "voc-21")
    if raw_ade:
        annotations = "annotations/{long}"
    for split, items in splits.items():
        long = {"train": "training", "val": "validation"}[split]
        for i, s in enumerate(items):
            stem = f"{split}_{i:05d}"
            _save_jpg(s.image, base / images.format(long=long) / f"{stem}.jpg")
            labels = s.labels.astype(np.int64)
            labels = np.where(labels == IGNORE, ignore, labels)
            labels[:2, :2] = ignore  # some unannotated pixels in every image
            if raw_ade:
                labels = np.where(labels == ignore, 0, labels + 1)
            _save_label(labels, base / annotations.format(long=long) / f"{stem}{ext}")
    return base


def segment_ids(k: int) -> int:
    """Segment ids that use all three PNG channels."""
    return 70000 + 300 * k + 7


def write_panoptic(root: Path, key: str, splits: dict[str, list[Sample]], crowd_every: int = 3) -> Path:
    """COCO-format panoptic ground truth; every ``crowd_every``-th image's last object is a crowd."""
    if key == "coco-panoptic":
        base = root / "coco"
        paths = lambda split: (f"{split}2017", f"panoptic_{split}2017", f"annotations/panoptic_{split}2017.json")  # noqa: E731
    else:
        base = root / "ADEChallengeData2016"
        paths = lambda split: (  # noqa: E731
            "images/" + {"train": "training", "val": "validation"}[split],
            f"ade20k_panoptic_{split}",
            f"ade20k_panoptic_{split}.json",
        )
    # COCO-style sparse category ids, listed out of order
    categories = [
        {"id": 10 + 3 * i, "name": c.name, "isthing": int(c.thing), "color": [0, 0, 0]} for i, c in enumerate(CLASSES)
    ][::-1]
    for split, items in splits.items():
        image_dir, png_dir, json_name = paths(split)
        images, annotations = [], []
        for i, s in enumerate(items):
            stem = f"{split}_{i:05d}"
            _save_jpg(s.image, base / image_dir / f"{stem}.jpg")
            ids = np.zeros(s.labels.shape, np.int64)
            info = []
            for k, (mask, name) in enumerate(zip(s.masks, s.names, strict=True)):
                sid = segment_ids(k)
                ids[mask] = sid
                index = next(j for j, c in enumerate(CLASSES) if c.name == name)
                crowd = CLASSES[index].thing and k == len(s.names) - 1 and i % crowd_every == 0
                info.append(
                    {
                        "id": sid,
                        "category_id": 10 + 3 * index,
                        "iscrowd": int(crowd),
                        "area": int(mask.sum()),
                        "bbox": [0, 0, 1, 1],
                    }
                )
            ids[:2, :2] = 0  # void
            rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
            (base / png_dir).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).save(base / png_dir / f"{stem}.png")
            images.append({"id": 1000 + i, "file_name": f"{stem}.jpg", "height": ids.shape[0], "width": ids.shape[1]})
            annotations.append({"image_id": 1000 + i, "file_name": f"{stem}.png", "segments_info": info})
        (base / json_name).parent.mkdir(parents=True, exist_ok=True)
        spec = {"images": images, "annotations": annotations[::-1], "categories": categories}
        (base / json_name).write_text(json.dumps(spec))
    return base
