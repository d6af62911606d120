"""Every ``knnclip segment --format`` read back with its reference reader (pycocotools for COCO
instance results and RLE; panopticapi's id encoding and JSON layout for COCO panoptic; Pillow for
label PNGs) and compared with the in-memory result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import coco as coco
from pycocotools import mask as coco_mask

from knnclip.engine import Database, Segmenter
from knnclip.engine.demo.synthetic import CLASSES, make_split
from knnclip.engine.formats import write_label_png


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from knnclip.engine.demo.run import DemoSettings, build_models

    root = tmp_path_factory.mktemp("formats")
    models = build_models(DemoSettings(out=root), say=lambda _: None)
    train = make_split(8, seed=1)
    with Segmenter.from_dir(models, root / "db", device="cpu", text_cache=None) as seg:
        seg.add_examples(
            [s.image for s in train],
            [s.masks for s in train],
            [s.names for s in train],
            things={c.name: c.thing for c in CLASSES},
        )
    images = []
    for i, s in enumerate(make_split(3, seed=9)):
        path = root / f"img{i}.png"
        Image.fromarray(s.image).save(path)
        images.append(path)
    out = root / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "knnclip.engine.cli",
            "segment",
            *map(str, images),
            "--models",
            str(models),
            "--db",
            str(root / "db"),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--panoptic",
            "--format",
            "json",
            "label-png",
            "coco-instances",
            "coco-panoptic",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    with Segmenter.from_dir(models, root / "db", device="cpu", read_only=True, text_cache=None) as seg:
        results = [seg.segment(str(p), instance=True) for p in images]
        things = {c.id for c in seg.db.vocabulary.values() if c.thing}
    return out, images, results, things


def test_coco_instance_results_load_with_pycocotools(setup) -> None:
    out, images, results, things = setup
    gt = coco.COCO()
    gt.dataset = json.loads((out / "coco_images.json").read_text())
    gt.createIndex()
    loaded = gt.loadRes(str(out / "coco_instances.json"))
    assert len(loaded.getAnnIds()) == sum(len(r.instances) for r in results) > 0
    for image_id, result in enumerate(results, 1):
        anns = sorted(loaded.loadAnns(loaded.getAnnIds(imgIds=[image_id])), key=lambda a: -a["score"])
        # COCO's categories count from 1: category id = class id + 1
        assert [a["category_id"] for a in anns] == [i.class_id + 1 for i in result.instances]
        assert all(a["category_id"] - 1 in things for a in anns), "instances are things"
        assert all(cat["id"] >= 1 for cat in gt.dataset["categories"])
        np.testing.assert_allclose([a["score"] for a in anns], [i.score for i in result.instances], rtol=1e-6)
        for ann, inst in zip(anns, result.instances, strict=True):
            np.testing.assert_array_equal(loaded.annToMask(ann).astype(bool), inst.mask)
            ys, xs = np.nonzero(inst.mask)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_coco_panoptic_png_and_segments_info(setup) -> None:
    out, images, results, _ = setup
    spec = json.loads((out / "panoptic.json").read_text())
    assert [a["image_id"] for a in spec["annotations"]] == [1, 2, 3]
    names = {c["id"]: c["name"] for c in spec["categories"]}
    assert min(names) >= 1 and all(names[s.class_id + 1] == s.name for r in results for s in r.segments)
    for annotation, result in zip(spec["annotations"], results, strict=True):
        rgb = np.asarray(Image.open(out / "panoptic" / annotation["file_name"]), np.uint32)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]  # panopticapi's rgb2id
        np.testing.assert_array_equal(ids, result.panoptic)
        info = {s["id"]: s for s in annotation["segments_info"]}
        assert set(info) == {s.id for s in result.segments} == set(np.unique(ids).tolist()) - {0}
        for s in result.segments:
            assert info[s.id]["category_id"] == s.class_id + 1 and info[s.id]["area"] == int((ids == s.id).sum())


def test_label_pngs_read_back(setup, tmp_path: Path) -> None:
    out, images, results, _ = setup
    for path, result in zip(images, results, strict=True):
        semantic = np.asarray(Image.open(out / f"{path.stem}.semantic.png"))
        assert semantic.dtype == np.uint8
        np.testing.assert_array_equal(semantic, result.semantic)
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{path.stem}.panoptic.png")), result.panoptic)
    labels = np.array([[0, 300], [65535, 7]], np.int64)  # more than 255 classes: 16-bit
    write_label_png(labels, tmp_path / "wide.png")
    back = np.asarray(Image.open(tmp_path / "wide.png"))
    assert back.dtype in (np.uint16, np.int32) and back.tolist() == labels.tolist()


def test_rle_round_trip() -> None:
    from knnclip.engine.formats import rle

    mask = np.random.default_rng(0).random((37, 53)) < 0.3
    encoded = rle(mask)
    json.dumps(encoded)
    decoded = coco_mask.decode({"size": encoded["size"], "counts": encoded["counts"].encode()})
    np.testing.assert_array_equal(decoded.astype(bool), mask)
    assert Database  # the module's public names import cleanly


def test_classes_are_stuff_unless_said_and_instances_left_stuff_are_warned(setup, tmp_path: Path, caplog) -> None:
    from knnclip.engine.demo.run import DemoSettings, build_models

    models = build_models(DemoSettings(out=tmp_path), say=lambda _: None)
    sample = next(s for s in make_split(20, seed=4, objects=("ball",)) if s.names.count("ball") > 1)
    with Segmenter.from_dir(models, tmp_path / "db", device="cpu", text_cache=None) as seg:
        with caplog.at_level("WARNING"):
            seg.add_examples([sample.image], [sample.masks], [sample.names])
        assert "['ball']" in caplog.text and "instances" in caplog.text
        assert not seg.db.vocabulary.find("ball").thing and not seg.db.vocabulary.find("sky").thing
        caplog.clear()
        with caplog.at_level("WARNING"):
            seg.add_examples([sample.image], [sample.masks], [sample.names], things={"ball": True})
        assert seg.db.vocabulary.find("ball").thing and caplog.text == ""
