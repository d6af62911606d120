"""Pictures and hand-offs of a result: Result.plot's pixels against values computed here from the
definition (a blend of the image and the class colour, white outlines, a label box per segment),
Result.save's files, and Result.to_supervision's Detections."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from knnclip.engine.render import class_colour
from tests.support.results import handmade_result

SCALE = 12  # a 60 x 84 picture: room for the labels


def grey_image(result) -> np.ndarray:
    return np.full((*result.semantic.shape, 3), 100, np.uint8)


def test_segments_are_filled_outlined_and_labelled() -> None:
    result = handmade_result(SCALE)
    image = grey_image(result)
    picture = result.plot(image)
    assert picture.shape == image.shape and picture.dtype == np.uint8
    ids = result.panoptic
    edge = np.zeros(ids.shape, bool)
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    edge[:-1, :] |= ids[:-1, :] != ids[1:, :]
    white = (picture == 255).all(axis=-1)
    dark = (picture == 24).all(axis=-1)  # label boxes
    assert white[edge].sum() > 4 * SCALE, "segment borders are white"
    for y, x in zip(*np.nonzero(edge & ~white), strict=True):  # except where a label covers them
        assert dark[max(y - 12, 0) : y + 13, max(x - 12, 0) : x + 13].any(), (y, x)
    # Away from the labels: 0.5 image + 0.5 class colour.
    zebra = (4 * SCALE - 2, 6 * SCALE - 3)  # the zebra segment's lower right, below its label
    expected = np.floor(np.float64(100) * 0.5 + np.asarray(class_colour(3), np.float64) * 0.5)
    np.testing.assert_allclose(picture[zebra], expected, atol=1)
    void = (4 * SCALE + 9, 1)  # semantic class 0 (sky), in no segment
    np.testing.assert_allclose(picture[void], np.floor(50 + np.asarray(class_colour(0)) * 0.5), atol=1)
    # Each segment's label, a dark box with lighter text, stands on its middle pixel: the median
    # pixel of its median row.
    for segment_id in (1, 2):
        ys, xs = np.nonzero(result.panoptic == segment_id)
        row = int(np.median(ys))
        middle = int(np.sort(xs[ys == row])[len(xs[ys == row]) // 2])
        window = picture[row - 2 : row + 3, middle - 2 : middle + 3].reshape(-1, 3)
        fill = np.floor(50 + np.asarray(class_colour(result.segments[segment_id - 1].class_id)) * 0.5)
        assert (window == 24).all(axis=-1).any(), segment_id  # the label's box (and its text)
        assert not (np.abs(window - fill) <= 1).all(axis=-1).any(), segment_id  # no fill shows through
    assert (picture.min(axis=-1) > 150).sum() > 40, "with text on them"


def test_evidence_adds_a_panel_and_no_segments_labels_the_classes() -> None:
    result = handmade_result(SCALE)
    image = grey_image(result)
    with_evidence = result.plot(image, evidence=True)
    assert with_evidence.shape[0] == image.shape[0] + 14 * 2 + 6 and with_evidence.shape[1] == image.shape[1]
    np.testing.assert_array_equal(with_evidence[: image.shape[0]], result.plot(image))
    panel = with_evidence[image.shape[0] :]
    assert (panel.min(axis=-1) > 150).sum() > 50, "lines of text"
    assert (panel[5:14, 4:13] == class_colour(3)).all(), "each line starts with its class's colour"
    result.segments = []
    result.panoptic = np.zeros_like(result.panoptic)
    semantic_only = result.plot(image)
    zebra_middle = semantic_only[int(2.5 * SCALE) - 2 : int(2.5 * SCALE) + 2, 4 * SCALE - 2 : 4 * SCALE + 2]
    assert (zebra_middle == (24, 24, 24)).all(axis=-1).any(), "each semantic class labelled by name"
    with pytest.raises(ValueError, match="the image is"):
        result.plot(image[:-1])


def test_save_writes_what_the_cli_writes(tmp_path) -> None:
    result = handmade_result(SCALE)
    out = result.save(tmp_path / "out", ("json", "label-png", "coco-panoptic"), image=grey_image(result))
    assert sorted(p.name for p in out.iterdir()) == [
        "panoptic",
        "panoptic.json",
        "photo.json",
        "photo.overlay.png",
        "photo.panoptic.png",
        "photo.semantic.png",
    ]
    assert json.loads((out / "photo.json").read_text()) == json.loads(json.dumps(result.to_json()))
    np.testing.assert_array_equal(np.asarray(Image.open(out / "photo.semantic.png")), result.semantic)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "photo.overlay.png")), result.plot(grey_image(result)))
    spec = json.loads((out / "panoptic.json").read_text())
    # COCO counts categories from 1: class id + 1, named from the result's own classes
    assert spec["categories"] == [
        {"id": 1, "name": "sky", "isthing": 0},
        {"id": 2, "name": "water", "isthing": 0},
        {"id": 4, "name": "zebra", "isthing": 1},
    ]
    assert [s["category_id"] for s in spec["annotations"][0]["segments_info"]] == [4, 1]


def test_to_supervision_gives_detections() -> None:
    sv = pytest.importorskip("supervision", reason="Result.to_supervision needs supervision (the supervision extra)")
    result = handmade_result(SCALE)
    detections = result.to_supervision()
    assert isinstance(detections, sv.Detections) and len(detections) == 2
    np.testing.assert_array_equal(detections.xyxy, [[2 * SCALE, SCALE, 6 * SCALE, 4 * SCALE], [0, 0, 7 * SCALE, SCALE]])
    np.testing.assert_array_equal(detections.mask[0], result.panoptic == 1)
    assert detections.class_id.tolist() == [3, 0] and detections.data["class_name"].tolist() == ["zebra", "sky"]
    np.testing.assert_allclose(detections.confidence, [0.912345678, 0.5], rtol=1e-6)
