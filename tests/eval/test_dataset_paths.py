"""Dataset annotations cannot lead a reader outside the dataset: absolute names, .. and links are
refused for that image, and the others still read."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.parametrize("hostile", ["/etc/passwd", "../../outside.jpg", "sub/../../outside.jpg", "link.jpg"])
def test_annotation_file_names_cannot_leave_the_dataset(tmp_path: Path, hostile: str) -> None:
    import json

    from knnclip.engine.errors import DatasetError
    from knnclip.engine.eval.datasets import open_dataset
    from tests.support.dataset_writers import samples, write_panoptic

    data = samples(2, 2, size=(32, 48))
    base = write_panoptic(tmp_path / "data", "coco-panoptic", data)
    outside = tmp_path / "outside.jpg"
    outside.write_bytes((base / "val2017" / "val_00000.jpg").read_bytes())
    (base / "val2017" / "link.jpg").symlink_to(outside)
    spec_path = base / "annotations" / "panoptic_val2017.json"
    spec = json.loads(spec_path.read_text())
    spec["images"][0]["file_name"] = hostile
    spec_path.write_text(json.dumps(spec))
    ds = open_dataset("coco-panoptic", tmp_path / "data", "val")
    index = next(i for i, name in enumerate(ds.names) if name == "val_00000")
    with pytest.raises(DatasetError, match="leads outside|symlink"):
        ds.image(index)
    ds.image(1 - index)  # the other image is fine
