"""Mask AP (knnclip eval instance) against pycocotools run directly: the ground truth built here
from the dataset's own files (panoptic PNGs and their JSON, panopticapi's id encoding), the
same predictions, COCOeval called by hand. An oracle segmenter that returns the true instances
scores AP 1; a worse one scores what pycocotools says, to the last digit."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from knnclip.engine import Database
from knnclip.engine.eval.datasets import open_dataset
from knnclip.engine.eval.instance import AP_NAMES, evaluate_instances
from knnclip.engine.pipeline.results import InstanceMask, Result
from tests.support.dataset_writers import samples, write_panoptic


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("datasets")
    write_panoptic(root, "coco-panoptic", samples(0, 6, size=(96, 128)))
    return root


class OracleSegmenter:
    """A segmenter stand-in whose instances are the dataset's own thing segments (all, or a
    chosen few with a false alarm), scored by a rule: what the evaluation is checked against."""

    def __init__(self, db: Database, ds, keep_every: int = 1, false_alarms: bool = False) -> None:
        self.db, self.ds, self.keep_every, self.false_alarms = db, ds, keep_every, false_alarms

    def segment(self, image, name=None, *, panoptic=True, instance=False) -> Result:
        i = self.ds.names.index(name)
        ids, info = self.ds.segments(i)
        instances = []
        for k, (segment_id, (index, _)) in enumerate(sorted(info.items())):
            cls = self.ds.classes[index]
            if not cls.thing or k % self.keep_every:
                continue
            class_id = self.db.vocabulary.find(cls.name).id
            mask = ids == segment_id
            instances.append(InstanceMask(class_id, cls.name, 0.9 - 0.05 * k, mask))
            if self.false_alarms:  # the same class somewhere else, scored higher
                instances.append(InstanceMask(class_id, cls.name, 0.95, np.roll(mask, 40, axis=1) & ~mask))
        empty = np.zeros(ids.shape, np.int32)
        return Result(empty, empty, [], dict(self.db.vocabulary.items()), {}, name or "", instances)


def direct_ap(root: Path, found: list[dict]) -> list[float]:
    """COCOeval by hand on the dataset's files: thing segments of panoptic_val2017.json, their
    masks from the PNGs (id = R + 256 G + 256^2 B), crowd flags as written."""
    spec = json.loads((root / "coco" / "annotations" / "panoptic_val2017.json").read_text())
    things = {c["id"] for c in spec["categories"] if c["isthing"]}
    truth = {"images": [], "annotations": [], "categories": [c for c in spec["categories"] if c["isthing"]]}
    for ann in spec["annotations"]:
        rgb = np.asarray(Image.open(root / "coco" / "panoptic_val2017" / ann["file_name"]), np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        truth["images"].append({"id": ann["image_id"], "height": ids.shape[0], "width": ids.shape[1]})
        for s in ann["segments_info"]:
            mask = ids == s["id"]
            if s["category_id"] not in things or not mask.any():
                continue
            encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
            truth["annotations"].append(
                {
                    "id": len(truth["annotations"]) + 1,
                    "image_id": ann["image_id"],
                    "category_id": s["category_id"],
                    "segmentation": encoded,
                    "area": float(mask.sum()),
                    "iscrowd": s["iscrowd"],
                    "bbox": list(coco_mask.toBbox(encoded)),
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = truth
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(found), iouType="segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return [float(v) for v in evaluation.stats[:6]]


def found_in_raw_ids(oracle: OracleSegmenter, root: Path) -> list[dict]:
    """The oracle's instances as COCO results in the raw file's image and category ids."""
    spec = json.loads((root / "coco" / "annotations" / "panoptic_val2017.json").read_text())
    image_ids = {Path(img["file_name"]).stem: img["id"] for img in spec["images"]}
    category_ids = {c["name"]: c["id"] for c in spec["categories"]}
    out = []
    for name in oracle.ds.names:
        for inst in oracle.segment(None, name, instance=True).instances:
            encoded = coco_mask.encode(np.asfortranarray(inst.mask.astype(np.uint8)))
            out.append(
                {
                    "image_id": image_ids[name],
                    "category_id": category_ids[inst.name],
                    "segmentation": encoded,
                    "score": inst.score,
                }
            )
    return out


@pytest.mark.parametrize(("keep_every", "false_alarms"), [(1, False), (2, True)])
def test_mask_ap_equals_pycocotools_on_the_files(root: Path, tmp_path: Path, keep_every, false_alarms) -> None:
    ds = open_dataset("coco-panoptic", root, "val")
    with Database.create(tmp_path / "db", 8) as db:
        for c in ds.classes:
            db.add_class(c.name, c.synonyms, thing=c.thing)
        oracle = OracleSegmenter(db, ds, keep_every, false_alarms)
        got = evaluate_instances(oracle, ds)  # the oracle stands in for a Segmenter
        expected = direct_ap(root, found_in_raw_ids(oracle, root))
    assert [got[name] for name in AP_NAMES] == expected
    assert got["instances"] > 0 and got["images"] == 6
    if not false_alarms:
        assert got["ap"] == pytest.approx(1.0), "the true instances score AP 1 (crowds ignored)"
    else:
        assert 0.0 < got["ap"] < 1.0


def test_cli_eval_instance_writes_its_report(root: Path, tmp_path: Path, demo_models: Path) -> None:
    ds = open_dataset("coco-panoptic", root, "val")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "knnclip.engine.cli",
            "eval",
            "instance",
            "--dataset",
            "coco-panoptic",
            "--root",
            str(root),
            "--models",
            str(demo_models),
            "--out",
            str(tmp_path / "out"),
            "--json",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["protocol"] == "instance" and set(AP_NAMES) <= set(report["result"])
    assert report["result"]["images"] == len(ds) and report["result"]["categories"] == sum(c.thing for c in ds.classes)
    assert all(-1.0 <= report["result"][k] <= 1.0 for k in AP_NAMES)
    assert (tmp_path / "out" / "instance-coco-panoptic-val.md").read_text().startswith("# Instance evaluation")
