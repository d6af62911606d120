"""Readers of the segmentation datasets kNN-CLIP is measured on, in their prepared on-disk
layouts (the detectron2 / FC-CLIP preparation scripts'), streaming one example at a time.

``root`` is the folder that holds the datasets (detectron2's ``DETECTRON2_DATASETS``), or the
dataset's own folder. Semantic datasets give class-index maps with the dataset's ignore value;
panoptic ones give segment-id maps with their segments' classes and crowd flags too.

=================  =======================================================================
``ade20k-150``     ADEChallengeData2016/images/{training,validation}/*.jpg and
                   annotations_detectron2/... (0..149, 255 ignore) or the raw annotations/...
                   (1..150, 0 unlabelled)
``ade20k-847``     ADE20K_2021_17_01/images_detectron2/... and annotations_detectron2/... *.tif
                   (uint16, 65535 ignore)
``pc-59``          pascal_ctx_d2/images/... and annotations_ctx59/... *.png (255 ignore)
``pc-459``         pascal_ctx_d2/images/... and annotations_ctx459/... *.tif (65535 ignore)
``voc-21``         pascal_voc_d2/images/... and annotations_pascal21/... *.png (255 ignore)
``coco-panoptic``  coco/{train,val}2017/*.jpg, coco/panoptic_{train,val}2017/*.png,
                   coco/annotations/panoptic_{train,val}2017.json
``ade20k-panoptic`` ADEChallengeData2016/images/..., ade20k_panoptic_{train,val}/*.png,
                   ade20k_panoptic_{train,val}.json
=================  =======================================================================

Class names with synonyms come from FC-CLIP's class-name files (``classes.read_class_file``),
found beside the data; panoptic datasets fall back to their JSON's category names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from knnclip.engine.errors import DatasetError, InvalidInputError
from knnclip.engine.eval.datasets.classes import DatasetClass, parse_names, read_class_file, unique_names
from knnclip.engine.fsutil import confined
from knnclip.engine.pipeline.preprocess import load_image

LONG_SPLIT = {"train": "training", "val": "validation"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class SemanticLayout:
    folder: str
    images: str
    annotations: str
    extension: str
    ignore: int
    class_file: str
    raw_annotations: str | None = None  # ADE20K's own labels: 0 unlabelled, classes from 1


@dataclass(frozen=True)
class PanopticLayout:
    folder: str
    images: str
    pngs: str
    json: str
    class_file: str


SEMANTIC = {
    "ade20k-150": SemanticLayout(
        "ADEChallengeData2016",
        "images/{long}",
        "annotations_detectron2/{long}",
        ".png",
        255,
        "ade20k_150_with_prompt_eng.txt",
        raw_annotations="annotations/{long}",
    ),
    "ade20k-847": SemanticLayout(
        "ADE20K_2021_17_01",
        "images_detectron2/{long}",
        "annotations_detectron2/{long}",
        ".tif",
        65535,
        "ade20k_847_with_prompt_eng.txt",
    ),
    "pc-59": SemanticLayout(
        "pascal_ctx_d2", "images/{long}", "annotations_ctx59/{long}", ".png", 255, "pascal_ctx_59_with_prompt_eng.txt"
    ),
    "pc-459": SemanticLayout(
        "pascal_ctx_d2",
        "images/{long}",
        "annotations_ctx459/{long}",
        ".tif",
        65535,
        "pascal_ctx_459_with_prompt_eng.txt",
    ),
    "voc-21": SemanticLayout(
        "pascal_voc_d2",
        "images/{long}",
        "annotations_pascal21/{long}",
        ".png",
        255,
        "pascal_voc_21_with_prompt_eng.txt",
    ),
}
PANOPTIC = {
    "coco-panoptic": PanopticLayout(
        "coco",
        "{split}2017",
        "panoptic_{split}2017",
        "annotations/panoptic_{split}2017.json",
        "coco_panoptic_with_prompt_eng.txt",
    ),
    "ade20k-panoptic": PanopticLayout(
        "ADEChallengeData2016",
        "images/{long}",
        "ade20k_panoptic_{split}",
        "ade20k_panoptic_{split}.json",
        "ade20k_150_with_prompt_eng.txt",
    ),
}
DATASETS = (*SEMANTIC, *PANOPTIC, "synthetic")


def _dataset_dir(root: Path, folder: str, probe: str) -> Path:
    """``root/folder``, or ``root`` itself when it already is the dataset's folder."""
    for candidate in (root / folder, root):
        if (candidate / probe).exists():
            return candidate
    raise DatasetError(f"{root}: no {folder}/{probe} there (nor {probe} directly): is this the right root?")


def _class_file(explicit: str | os.PathLike[str] | None, name: str, base: Path, root: Path) -> Path | None:
    if explicit is not None:
        if not Path(explicit).is_file():
            raise DatasetError(f"{explicit}: no such class-name file")
        return Path(explicit)
    for candidate in (base / name, root / name, base.parent / name):
        if candidate.is_file():
            return candidate
    return None


def _read_label(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: unreadable annotation ({exc})") from None


class Dataset:
    """A split of a dataset: ``len(ds)``, ``ds.image(i)``, ``ds.semantic(i)``, ``ds.masks(i)``.

    Attributes: ``key`` (e.g. ``"ade20k-150"``), ``split``, ``classes`` (``DatasetClass`` per
    class index), ``ignore`` (the label of unannotated pixels in ``semantic``), ``panoptic``
    (whether ``segments(i)`` is available), ``names`` (one per example: the file stem).
    """

    key: str
    split: str
    classes: list[DatasetClass]
    ignore: int
    panoptic: bool
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.key} {self.split}: {len(self)} images, {len(self.classes)} classes>"

    def image(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def semantic(self, i: int) -> np.ndarray:
        """[H, W] int64 class indices, ``ignore`` where unannotated."""
        raise NotImplementedError

    def masks(self, i: int) -> tuple[np.ndarray, list[int]]:
        """The example's ground-truth masks as database entries take them: [N, H, W] bool and N
        class indices; one per class region (semantic datasets) or per non-crowd segment."""
        labels = self.semantic(i)
        present = [int(c) for c in np.unique(labels) if c != self.ignore]
        if not present:
            return np.zeros((0, *labels.shape), bool), []
        return labels[None] == np.asarray(present)[:, None, None], present

    def subset(self, indices: Sequence[int]) -> Subset:
        return Subset(self, list(indices))

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self)))

    def _check(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        return i % len(self)


class Subset(Dataset):
    """Some examples of a dataset, same classes."""

    def __init__(self, parent: Dataset, indices: list[int]) -> None:
        self.parent, self.indices = parent, indices
        self.key, self.split, self.classes = parent.key, parent.split, parent.classes
        self.ignore, self.panoptic = parent.ignore, parent.panoptic
        self.names = [parent.names[i] for i in indices]

    def image(self, i: int) -> np.ndarray:
        return self.parent.image(self.indices[self._check(i)])

    def semantic(self, i: int) -> np.ndarray:
        return self.parent.semantic(self.indices[self._check(i)])

    def masks(self, i: int) -> tuple[np.ndarray, list[int]]:
        return self.parent.masks(self.indices[self._check(i)])

    def segments(self, i: int) -> tuple[np.ndarray, dict[int, tuple[int, bool]]]:
        return self.parent.segments(self.indices[self._check(i)])  # type: ignore[attr-defined]


class SemanticDataset(Dataset):
    panoptic = False

    def __init__(self, key: str, root: Path, split: str, class_file: str | os.PathLike[str] | None) -> None:
        layout = SEMANTIC[key]
        long = LONG_SPLIT[split]
        images_rel = layout.images.format(long=long)
        base = _dataset_dir(root, layout.folder, images_rel)
        self.key, self.split, self.ignore = key, split, layout.ignore
        self._shift = False
        labels = base / layout.annotations.format(long=long)
        if not labels.is_dir() and layout.raw_annotations:
            labels, self._shift = base / layout.raw_annotations.format(long=long), True
        if not labels.is_dir():
            raise DatasetError(f"{base}: no annotation folder {layout.annotations.format(long=long)}")
        file = _class_file(class_file, layout.class_file, base, root)
        if file is None:
            raise DatasetError(
                f"{key}: class-name file {layout.class_file} not found in {base} or {root}; copy it there from "
                "FC-CLIP (fcclip/data/datasets/) or pass its path"
            )
        self.classes = unique_names(read_class_file(file))
        images = sorted(p for p in (base / images_rel).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise DatasetError(f"{base / images_rel}: no images")
        self._images = images
        self._labels = [labels / (p.stem + layout.extension) for p in images]
        missing = [str(p) for p in self._labels if not p.is_file()]
        if missing:
            raise DatasetError(f"{len(missing)} images have no annotation, e.g. {missing[0]}")
        self.names = [p.stem for p in images]

    def image(self, i: int) -> np.ndarray:
        return load_image(self._images[self._check(i)])

    def semantic(self, i: int) -> np.ndarray:
        path = self._labels[self._check(i)]
        raw = _read_label(path)
        if raw.ndim != 2:
            raise DatasetError(f"{path}: a label map has one channel, got shape {raw.shape}")
        labels = raw.astype(np.int64)
        if self._shift:
            labels = np.where(labels == 0, self.ignore, labels - 1)
        bad = (labels != self.ignore) & ((labels < 0) | (labels >= len(self.classes)))
        if bad.any():
            raise DatasetError(
                f"{path}: label {int(labels[bad][0])} is outside the {len(self.classes)} classes "
                f"(and is not the ignore label {self.ignore}); is the class-name file the dataset's?"
            )
        return labels


class PanopticDataset(Dataset):
    """COCO-format panoptic annotations: PNG segment ids (R + 256 G + 256^2 B) and a JSON."""

    panoptic = True
    ignore = 255

    def __init__(self, key: str, root: Path, split: str, class_file: str | os.PathLike[str] | None) -> None:
        layout = PANOPTIC[key]
        fmt = {"split": split, "long": LONG_SPLIT[split]}
        json_rel = layout.json.format(**fmt)
        base = _dataset_dir(root, layout.folder, json_rel)
        self.key, self.split = key, split
        self._json = base / json_rel
        try:
            spec = json.loads((base / json_rel).read_text())
            categories = sorted(spec["categories"], key=lambda c: c["id"])
            image_files = {im["id"]: im["file_name"] for im in spec["images"]}
            annotations = sorted(spec["annotations"], key=lambda a: a["file_name"])
            self._category_index = {c["id"]: i for i, c in enumerate(categories)}
            self._annotations = [
                (
                    image_files[a["image_id"]],
                    a["file_name"],
                    {
                        s["id"]: (self._category_index[s["category_id"]], bool(s.get("iscrowd", 0)))
                        for s in a["segments_info"]
                    },
                )
                for a in annotations
            ]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{base / json_rel}: not a COCO panoptic annotation file ({exc!r})") from None
        names = [parse_names(str(c["name"])) or (f"class {c['id']}",) for c in categories]
        file = _class_file(class_file, layout.class_file, base, root)
        if file is not None:
            prompt = read_class_file(file)
            if len(prompt) != len(categories):
                raise DatasetError(
                    f"{file}: {len(prompt)} classes but {base / json_rel} has {len(categories)} categories"
                )
            names = [c.names for c in prompt]
        self.classes = unique_names(
            [DatasetClass(n, bool(c.get("isthing", 0))) for n, c in zip(names, categories, strict=True)]
        )
        self._images = base / layout.images.format(**fmt)
        self._pngs = base / layout.pngs.format(**fmt)
        for folder in (self._images, self._pngs):
            if not folder.is_dir():
                raise DatasetError(f"{folder}: missing (layout of {key}: see knnclip.engine.eval.datasets.readers)")
        self.names = [Path(a[1]).stem for a in self._annotations]

    def _inside(self, folder: Path, name: object) -> Path:
        """``folder / name`` for a file name read from the annotation JSON, which never leads out
        of the dataset's folders (no absolute path, no ``..``, no symlink out)."""
        try:
            return confined(folder, str(name), "annotation file")
        except ValueError as exc:
            raise DatasetError(f"{self._json}: {exc}") from None

    def image(self, i: int) -> np.ndarray:
        return load_image(self._inside(self._images, self._annotations[self._check(i)][0]))

    def segments(self, i: int) -> tuple[np.ndarray, dict[int, tuple[int, bool]]]:
        """[H, W] int64 segment ids (0 = void) and ``{id: (class index, is_crowd)}``."""
        _, png, info = self._annotations[self._check(i)]
        path = self._inside(self._pngs, png)
        rgb = _read_label(path)
        if rgb.ndim != 3 or rgb.shape[2] < 3:
            raise DatasetError(f"{path}: a panoptic PNG is RGB, got shape {rgb.shape}")
        rgb = rgb[..., :3].astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        undescribed = set(np.unique(ids).tolist()) - set(info) - {0}
        if undescribed:
            raise DatasetError(f"{path}: segment ids {sorted(undescribed)[:5]} are not in the JSON's segments_info")
        return ids, info

    def semantic(self, i: int) -> np.ndarray:
        ids, info = self.segments(i)
        lut_ids = np.array([0, *info], np.int64)
        lut_cls = np.array([self.ignore, *(c for c, _ in info.values())], np.int64)
        order = np.argsort(lut_ids)
        return lut_cls[order][np.searchsorted(lut_ids[order], ids)]

    def masks(self, i: int) -> tuple[np.ndarray, list[int]]:
        ids, info = self.segments(i)
        kept = [(sid, c) for sid, (c, crowd) in info.items() if not crowd]
        masks = ids[None] == np.array([sid for sid, _ in kept], np.int64).reshape(-1, 1, 1)
        keep = masks.any(axis=(1, 2))  # a segment listed in the JSON may have no pixels
        return masks[keep], [c for (_, c), k in zip(kept, keep, strict=True) if k]


def open_dataset(
    key: str,
    root: str | os.PathLike[str] | None,
    split: str = "val",
    class_file: str | os.PathLike[str] | None = None,
) -> Dataset:
    """Open ``split`` ("train" or "val") of dataset ``key`` (one of ``DATASETS``) under ``root``
    (``"synthetic"``, the demo's generated data, needs no root)."""
    if key not in DATASETS:
        raise InvalidInputError(f"unknown dataset {key!r}; known: {', '.join(DATASETS)}")
    if split not in LONG_SPLIT:
        raise InvalidInputError(f"split must be 'train' or 'val', got {split!r}")
    if key == "synthetic":
        from knnclip.engine.demo.dataset import SyntheticDataset

        return SyntheticDataset(split)
    if root is None:
        raise InvalidInputError(f"{key}: give the datasets folder (--root)")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder")
    cls: Any = SemanticDataset if key in SEMANTIC else PanopticDataset
    return cls(key, root, split, class_file)
