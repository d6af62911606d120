"""The demo's synthetic dataset (``knnclip.engine.demo.synthetic``) as a ``Dataset``: ``--dataset
synthetic`` runs every evaluation protocol on a fresh machine with no data. Panoptic too: each
stuff region and object is a segment (no crowd regions)."""

from __future__ import annotations

import numpy as np

from knnclip.engine.demo.synthetic import CLASSES, IGNORE, IMAGE_SIZE, Sample, class_index, make_split
from knnclip.engine.eval.datasets.classes import DatasetClass
from knnclip.engine.eval.datasets.readers import Dataset

SPLITS = {"train": (48, 0), "val": (16, 1)}  # images, seed: the demo's defaults


class SyntheticDataset(Dataset):
    panoptic = True
    ignore = IGNORE

    def __init__(
        self, split: str, images: int | None = None, size: tuple[int, int] = IMAGE_SIZE, seed: int | None = None
    ) -> None:
        count, default_seed = SPLITS[split]
        self.key, self.split = "synthetic", split
        self.classes = [DatasetClass((c.name,), c.thing) for c in CLASSES]
        self.samples: list[Sample] = make_split(images or count, default_seed if seed is None else seed, size)
        self.names = [f"{split}_{i:05d}" for i in range(len(self.samples))]

    def image(self, i: int) -> np.ndarray:
        return self.samples[self._check(i)].image

    def semantic(self, i: int) -> np.ndarray:
        return self.samples[self._check(i)].labels.astype(np.int64)

    def segments(self, i: int) -> tuple[np.ndarray, dict[int, tuple[int, bool]]]:
        s = self.samples[self._check(i)]
        ids = np.zeros(s.labels.shape, np.int64)
        for k, mask in enumerate(s.masks):
            ids[mask] = k + 1
        return ids, {k + 1: (class_index(name), False) for k, name in enumerate(s.names)}

    def masks(self, i: int) -> tuple[np.ndarray, list[int]]:
        s = self.samples[self._check(i)]
        return s.masks, [class_index(n) for n in s.names]
