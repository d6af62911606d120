"""Dataset readers on tiny datasets written in the real layouts (tests/support/dataset_writers.py):
labels as written, class files as FC-CLIP writes them, panoptic ids over three channels, crowd
and void, and a clear error for every broken dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from knnclip.engine.demo.synthetic import CLASSES
from knnclip.engine.errors import DatasetError, InvalidInputError
from knnclip.engine.eval.datasets import open_dataset, read_class_file
from knnclip.engine.eval.datasets.classes import DatasetClass, unique_names
from tests.support.dataset_writers import CLASS_LINES, class_file, samples, segment_ids, write_panoptic, write_semantic

SEMANTIC_KEYS = ["ade20k-150", "ade20k-847", "pc-59", "pc-459", "voc-21"]


@pytest.fixture(scope="module")
def data():
    return samples(3, 2)


def expected_labels(sample, ignore):
    labels = sample.labels.astype(np.int64)
    labels[:2, :2] = ignore
    return labels


class TestSemantic:
    """Catches a reader that pairs the wrong files, mis-shifts ADE's raw labels, truncates 16-bit
    TIFF labels, or loses the ignore label."""

    @pytest.mark.parametrize("key", SEMANTIC_KEYS)
    def test_reads_what_was_written(self, tmp_path, data, key):
        write_semantic(tmp_path, key, data)
        for split in ("train", "val"):
            ds = open_dataset(key, tmp_path, split)
            assert len(ds) == len(data[split]) and ds.names[0] == f"{split}_00000"
            assert [c.names for c in ds.classes] == [tuple(n.split(",")) for n in CLASS_LINES]
            ignore = 65535 if key in ("ade20k-847", "pc-459") else 255
            assert ds.ignore == ignore
            for i, s in enumerate(data[split]):
                np.testing.assert_array_equal(ds.semantic(i), expected_labels(s, ignore))
                image = ds.image(i)
                assert image.shape == s.image.shape and np.abs(image.astype(int) - s.image).mean() < 6  # JPEG
                masks, classes = ds.masks(i)
                assert sorted(classes) == sorted(set(np.unique(s.labels).tolist()))
                for m, c in zip(masks, classes, strict=True):
                    np.testing.assert_array_equal(m, expected_labels(s, ignore) == c)

    def test_raw_ade_annotations_shift_by_one(self, tmp_path, data):
        write_semantic(tmp_path, "ade20k-150", data, raw_ade=True)
        ds = open_dataset("ade20k-150", tmp_path / "ADEChallengeData2016", "val")  # the dataset folder as root
        np.testing.assert_array_equal(ds.semantic(0), expected_labels(data["val"][0], 255))

    def test_subset(self, tmp_path, data):
        write_semantic(tmp_path, "voc-21", data)
        sub = open_dataset("voc-21", tmp_path, "train").subset([2, 0])
        assert sub.names == ["train_00002", "train_00000"]
        np.testing.assert_array_equal(sub.semantic(1), expected_labels(data["train"][0], 255))
        with pytest.raises(IndexError):
            sub.semantic(2)


class TestClassFiles:
    def test_fcclip_format(self, tmp_path):
        classes = read_class_file(class_file(tmp_path / "c.txt"))
        assert len(classes) == len(CLASS_LINES) and classes[3].names == ("water", "sea water")
        (tmp_path / "d.txt").write_text("0:invalid_class_id\n1: wall, walls ,wall\n\n2:floor\n")
        assert [c.names for c in read_class_file(tmp_path / "d.txt")] == [("wall", "walls"), ("floor",)]

    def test_names_unique_across_classes(self):
        out = unique_names(
            [DatasetClass(("background", "bag", "chair")), DatasetClass(("chair",)), DatasetClass(("bag2", "bag"))]
        )
        assert [c.names for c in out] == [("background", "bag"), ("chair",), ("bag2",)]
        with pytest.raises(DatasetError, match="both named 'a'"):
            unique_names([DatasetClass(("a",)), DatasetClass(("a", "b"))])

    @pytest.mark.parametrize("text", ["wall\n", "x:wall\n", "1:\n", ""])
    def test_malformed(self, tmp_path, text):
        (tmp_path / "c.txt").write_text(text)
        with pytest.raises(DatasetError, match="c.txt"):
            read_class_file(tmp_path / "c.txt")


class TestBrokenDatasets:
    """Catches a broken dataset that crashes deep inside the evaluation instead of failing early
    with the file named."""

    def test_unknown_dataset_and_split(self, tmp_path):
        with pytest.raises(InvalidInputError, match="known: ade20k-150"):
            open_dataset("ade20k", tmp_path)
        with pytest.raises(InvalidInputError, match="split"):
            open_dataset("voc-21", tmp_path, "test")
        with pytest.raises(DatasetError, match="no such dataset folder"):
            open_dataset("voc-21", tmp_path / "nowhere")
        with pytest.raises(DatasetError, match="right root"):
            open_dataset("voc-21", tmp_path)

    def test_missing_class_file_says_where_to_get_it(self, tmp_path, data):
        base = write_semantic(tmp_path, "pc-59", data)
        (base / "pascal_ctx_59_with_prompt_eng.txt").unlink()
        with pytest.raises(DatasetError, match="FC-CLIP"):
            open_dataset("pc-59", tmp_path)
        ds = open_dataset("pc-59", tmp_path, class_file=class_file(tmp_path / "elsewhere.txt"))
        assert len(ds.classes) == len(CLASS_LINES)

    def test_image_without_annotation(self, tmp_path, data):
        base = write_semantic(tmp_path, "pc-59", data)
        (base / "annotations_ctx59/validation/val_00001.png").unlink()
        with pytest.raises(DatasetError, match="val_00001.png"):
            open_dataset("pc-59", tmp_path)

    def test_label_outside_the_classes(self, tmp_path, data):
        base = write_semantic(tmp_path, "ade20k-847", data)
        (base / "ade20k_847_with_prompt_eng.txt").write_text("0:invalid_class_id\n1:sky\n2:grass\n")
        ds = open_dataset("ade20k-847", tmp_path)
        with pytest.raises(DatasetError, match="outside the 2 classes"):
            for i in range(len(ds)):
                ds.semantic(i)

    def test_corrupt_annotation(self, tmp_path, data):
        base = write_semantic(tmp_path, "voc-21", data)
        (base / "annotations_pascal21/validation/val_00000.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
        with pytest.raises(DatasetError, match="val_00000.png: unreadable"):
            open_dataset("voc-21", tmp_path).semantic(0)


class TestPanoptic:
    """Catches a wrong RGB-to-id decoding, crowd segments used as examples, or categories mapped
    by their sparse ids instead of their order."""

    @pytest.mark.parametrize("key", ["coco-panoptic", "ade20k-panoptic"])
    def test_reads_segments_crowd_and_void(self, tmp_path, data, key):
        write_panoptic(tmp_path, key, data, crowd_every=1)
        ds = open_dataset(key, tmp_path, "val")
        assert ds.panoptic and [c.name for c in ds.classes] == [c.name for c in CLASSES]
        assert [c.thing for c in ds.classes] == [c.thing for c in CLASSES]
        for i, s in enumerate(data["val"]):
            ids, info = ds.segments(i)
            assert ids[0, 0] == 0
            for k, (mask, name) in enumerate(zip(s.masks, s.names, strict=True)):
                sid = segment_ids(k)
                assert info[sid][0] == [c.name for c in CLASSES].index(name)
                inside = mask.copy()
                inside[:2, :2] = False
                assert (ids[inside] == sid).all()
            crowd = [sid for sid, (_, c) in info.items() if c]
            assert len(crowd) == (1 if CLASSES[info[segment_ids(len(s.names) - 1)][0]].thing else 0)
            masks, classes = ds.masks(i)
            assert len(masks) == len(s.names) - len(crowd)
            semantic = ds.semantic(i)
            assert semantic[0, 0] == 255 and set(np.unique(semantic).tolist()) - {255} <= set(classes) | {
                info[c][0] for c in crowd
            }

    def test_prompt_file_renames_classes(self, tmp_path, data):
        base = write_panoptic(tmp_path, "coco-panoptic", data)
        ds = open_dataset("coco-panoptic", tmp_path, "train")
        assert ds.classes[3].names == ("water",)
        class_file(base / "coco_panoptic_with_prompt_eng.txt")
        assert open_dataset("coco-panoptic", tmp_path, "train").classes[3].names == ("water", "sea water")
        (base / "coco_panoptic_with_prompt_eng.txt").write_text("1:one\n2:two\n")
        with pytest.raises(DatasetError, match="2 classes but"):
            open_dataset("coco-panoptic", tmp_path, "train")

    def test_undescribed_segment_and_bad_json(self, tmp_path, data):
        base = write_panoptic(tmp_path, "ade20k-panoptic", data)
        spec_path = base / "ade20k_panoptic_val.json"
        spec = json.loads(spec_path.read_text())
        spec["annotations"][0]["segments_info"] = spec["annotations"][0]["segments_info"][1:]
        spec_path.write_text(json.dumps(spec))
        ds = open_dataset("ade20k-panoptic", tmp_path, "val")
        name = spec["annotations"][0]["file_name"]
        with pytest.raises(DatasetError, match="not in the JSON"):
            ds.segments(ds.names.index(name[:-4]))
        spec_path.write_text('{"images": []}')
        with pytest.raises(DatasetError, match="not a COCO panoptic"):
            open_dataset("ade20k-panoptic", tmp_path, "val")


def test_synthetic_dataset_needs_no_root():
    ds = open_dataset("synthetic", None, "val")
    assert len(ds) == 16 and ds.panoptic and [c.name for c in ds.classes] == [c.name for c in CLASSES]
    ids, info = ds.segments(0)
    masks, classes = ds.masks(0)
    assert len(masks) == len(info) == len(classes) and not any(crowd for _, crowd in info.values())
    semantic = ds.semantic(0)
    for sid, (c, _) in info.items():
        assert (semantic[ids == sid] == c).all()
    with pytest.raises(InvalidInputError, match="--root"):
        open_dataset("voc-21", None)
