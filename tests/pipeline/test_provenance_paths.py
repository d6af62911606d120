"""The segmenter's ways of adding record where each entry came from: an image file by its name,
an array by its pixels' digest, each entry with its mask's index in its image (masks too small to
embed are skipped, so the indices have gaps); a source removed leaves every other entry."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from knnclip.engine.demo.synthetic import make_split
from knnclip.engine.pipeline.segmenter import Segmenter


def test_add_examples_records_each_images_name_and_mask_indices(demo_models: Path, tmp_path: Path) -> None:
    first, second = make_split(2, seed=5)
    path = tmp_path / "street.png"
    Image.fromarray(first.image).save(path)
    tiny = np.zeros((1, *first.masks.shape[1:]), bool)
    tiny[0, 0, 0] = True  # covers no key-grid cell: skipped
    masks = np.concatenate([first.masks[:1], tiny, first.masks[1:3]])
    labels = [first.names[0], "speck", *first.names[1:3]]
    with Segmenter.from_dir(demo_models, tmp_path / "db", device="cpu", text_cache=None) as seg:
        ids = seg.add_examples([str(path), second.image], [masks, second.masks], [labels, second.names])
        from_file = seg.entries(source="street.png")
        assert [r.mask for r in from_file] == [0, 2, 3], "the mask's index in its image; the speck was skipped"
        assert [r.class_name for r in from_file] == [labels[0], labels[2], labels[3]]
        digest = "sha256:" + hashlib.sha256(np.ascontiguousarray(second.image).tobytes()).hexdigest()[:16]
        from_array = seg.entries(source=digest)
        assert len(from_array) == len(ids) - 3 and [r.mask for r in from_array] == list(range(len(from_array)))
        assert seg.remove_source("street.png") == 3
        assert [r.id for r in seg.entries()] == [r.id for r in from_array]
