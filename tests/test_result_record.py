"""One rendering of a result: the CLI's NAME.json, the HTTP reply and a video's frames.jsonl hold
the same segment record for the same ``Result``, and the record reads back into that ``Result``.
Expected values (areas, boxes, run lengths) are computed here from the arrays with NumPy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from knnclip.engine import formats
from knnclip.engine.errors import InvalidInputError
from knnclip.engine.serve.encoding import result_payload
from tests.support.results import handmade_result


def without_masks(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "segmentation"}


def test_cli_service_and_video_write_the_same_segment_record(tmp_path):
    from knnclip.engine.video.outputs import frame_record
    from knnclip.engine.video.source import Frame

    result = handmade_result()
    writer = formats.ResultWriter(tmp_path, ("json",))
    writer.write("photo", result)
    cli = json.loads((tmp_path / "photo.json").read_text())
    http = json.loads(json.dumps(result_payload(result, "coco-instances")))
    video = json.loads(json.dumps(frame_record(Frame(4, 0.25, np.zeros((5, 7, 3), np.uint8)), result)))
    assert (
        cli["segments"] == [without_masks(s) for s in http["segments"]] == [without_masks(s) for s in video["segments"]]
    )
    assert http["segments"] == video["segments"]  # both with masks
    assert cli["instances"] == [without_masks(i) for i in http["instances"]]
    expected_first = {
        "id": 1,
        "class": "zebra",
        "class_id": 3,
        "score": 0.912346,
        "area": 12,
        "thing": True,
        "bbox": [2, 1, 4, 3],
        "evidence": {
            "base_class": "horse",
            "retrieved_class": "zebra",
            "retrieval_confidence": 0.841235,
            "neighbours": [["zebra", 0.93], ["horse", 0.5]],
            "changed": True,
        },
    }
    assert cli["segments"][0] == expected_first
    assert cli["classes"] == ["sky", "water", None, "zebra"] and (cli["height"], cli["width"]) == (5, 7)
    for s in http["segments"]:
        rle = {"size": s["segmentation"]["size"], "counts": s["segmentation"]["counts"].encode()}
        np.testing.assert_array_equal(coco_mask.decode(rle).astype(bool), result.panoptic == s["id"])
    assert (video["frame"], video["time"]) == (4, 0.25) and "image" not in http and cli["image"] == "photo.png"


def test_label_map_rle_follows_cocos_column_order():
    labels = np.array([[1, 1, 5], [2, 1, 5]])
    encoded = formats.label_rle(labels)
    # Column-major runs written out by hand: 1, 2 | 1, 1 | 5, 5.
    assert encoded == {"size": [2, 3], "counts": [1, 1, 2, 2], "values": [1, 2, 1, 5]}
    assert formats.label_map(encoded).tolist() == labels.tolist()


@pytest.mark.parametrize("fmt", ["json", "label-png", "coco-instances", "png", "coco"])
def test_a_reply_reads_back_into_the_same_result(fmt):
    result = handmade_result()
    record = json.loads(json.dumps(result_payload(result, fmt)))
    if fmt in ("json", "label-png", "png"):
        record["instances"] = []  # instances need their masks
    back = formats.result_from_record(record)
    np.testing.assert_array_equal(back.semantic, result.semantic)
    np.testing.assert_array_equal(back.panoptic, result.panoptic)
    assert back.classes == result.classes and back.timings == {"total": 12.346}
    assert [(s.id, s.class_id, s.name, s.area, s.is_thing) for s in back.segments] == [
        (s.id, s.class_id, s.name, s.area, s.is_thing) for s in result.segments
    ]
    assert back.segments[0].evidence.neighbours == (("zebra", 0.93), ("horse", 0.5))
    if record["instances"]:
        np.testing.assert_array_equal(back.instances[0].mask, result.instances[0].mask)


def test_reply_formats_are_one_vocabulary(tmp_path):
    assert set(formats.REPLY_FORMATS) < set(formats.FORMATS)
    assert set(formats.FORMAT_ALIASES.values()) <= set(formats.REPLY_FORMATS)
    with pytest.raises(InvalidInputError, match="written as files"):
        formats.reply_encoding("coco-panoptic")
    with pytest.raises(InvalidInputError, match="format must be one of"):
        formats.reply_encoding("xml")
    with pytest.raises(InvalidInputError, match="unknown formats"):
        formats.ResultWriter(tmp_path / "out", ("json", "png"))
    assert not (tmp_path / "out").exists(), "refused before its folder is made"


def test_a_record_missing_a_key_is_refused_by_name():
    record = result_payload(handmade_result())
    del record["segments"][0]["class"]
    with pytest.raises(InvalidInputError, match="'class'"):
        formats.result_from_record(record)
