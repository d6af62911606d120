"""The segmenter end to end on CPU with the official fixtures' models exported to ONNX: FC-CLIP's
official outputs with an empty database, retrieval correcting classes, vocabulary growth without
touching old entries, backends agreeing, bad images, threads, the CLI."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from knnclip.engine.cli import main
from knnclip.engine.config import RetrievalConfig
from knnclip.engine.errors import InvalidInputError
from knnclip.engine.pipeline import preprocess
from knnclip.engine.pipeline.segmenter import Result
from knnclip.export.fcclip.onnx import export_fcclip_onnx
from tests.support.fcclip_helpers import load_fixture
from tests.support.fixture_models import image, open_segmenter, seen_names


@pytest.fixture()
def seg(models, tmp_path):
    with open_segmenter(models, tmp_path / "db") as s:
        yield s


class TestBasePrediction:
    """Catches a pipeline that departs from FC-CLIP where the database has nothing to say."""

    def test_empty_database_gives_official_fcclip(self, seg):
        fx = load_fixture("fcclip_resize")
        result = seg.segment(image())
        np.testing.assert_array_equal(result.panoptic, fx.io["panoptic_seg"])
        assert [s.class_id for s in result.segments] == fx.io["segments_category_id"].tolist()
        assert all(not s.evidence.changed and s.evidence.retrieved_class is None for s in result.segments)
        official = fx.io["sem_seg"]
        agree = result.semantic == official.argmax(0)
        top2 = np.sort(official, axis=0)[-2:]
        assert agree.mean() > 0.999 and (top2[1] - top2[0])[~agree].max(initial=0) < 1e-4, "only near-ties differ"

    def test_instances_are_the_official_ones(self, seg):
        """Through the whole engine (ONNX Runtime, the database's vocabulary, no retrieval):
        FC-CLIP's instance inference, scores and classes to 1e-5, masks exactly."""
        fx = load_fixture("fcclip_resize")
        result = seg.segment(image(), instance=True)
        order = np.argsort(-fx.io["inst_scores"], kind="stable")
        np.testing.assert_allclose([i.score for i in result.instances], fx.io["inst_scores"][order], rtol=1e-4)
        assert [i.class_id for i in result.instances] == fx.io["inst_pred_classes"][order].tolist()
        assert all(result.classes[i.class_id] == i.name for i in result.instances)
        masks = np.stack([i.mask for i in result.instances])
        agree = masks == fx.io["inst_pred_masks"][order].astype(bool)
        assert agree.mean() > 0.9999, "masks differ only where a logit sits at 0 (ONNX Runtime vs torch)"
        assert seg.segment(image()).instances == []

    def test_panoptic_is_consistent(self, seg):
        result = seg.segment(image())
        ids = [s.id for s in result.segments]
        assert len(set(ids)) == len(ids) and set(np.unique(result.panoptic)) - {0} == set(ids)
        for s in result.segments:
            assert s.area == int((result.panoptic == s.id).sum()) and s.name == result.classes[s.class_id]
        assert set(np.unique(result.semantic)) <= set(result.classes)

    def test_timings_and_json(self, seg):
        result = seg.segment(image(), name="fixture")
        stages = {"decode", "preprocess", "fcclip", "dinov2", "classify", "pool", "search", "fuse", "postprocess"}
        assert stages <= set(result.timings) and result.timings["total"] >= sum(result.timings[s] for s in stages)
        data = json.loads(json.dumps(result.to_json()))
        assert data["image"] == "fixture" and (data["height"], data["width"]) == (250, 330)


class TestRetrieval:
    """Catches retrieval that does not reach the output, or that forgets."""

    def test_new_classes_from_examples_reach_the_output(self, seg):
        base = seg.segment(image())
        glacier = base.panoptic == next(s.id for s in base.segments if s.name == "glacier")
        old_ids = seg.add_examples([image()], [np.stack([glacier, ~glacier])], [["ice cave", "tarmac"]])
        assert seg.db.classes["ice cave"] == 1 and {"ice cave", "tarmac"} <= set(seg.classes)
        after = seg.segment(image())
        new = {seg.class_id("ice cave"), seg.class_id("tarmac")}
        assert np.isin(after.semantic, list(new)).mean() > 0.5, "the new classes take over the image"
        # Random-weight queries overlap heavily, so FC-CLIP's overlap rule may keep no segment once
        # retrieval makes them confident; those it keeps must carry consistent evidence.
        for s in after.segments:
            assert s.class_id in new
            assert s.evidence.neighbours and s.evidence.retrieved_class in ("ice cave", "tarmac")
            assert s.evidence.changed == (s.name != s.evidence.base_class)
        vectors = seg.db.vectors(old_ids)
        seg.add_examples([image()], [glacier[None]], [["snowfield"]])
        np.testing.assert_array_equal(seg.db.vectors(old_ids), vectors)  # zero forgetting

    def test_fusion_follows_the_definition(self, models, tmp_path):
        """lam=0: retrieval is computed and reported but never changes a prediction."""
        with open_segmenter(models, tmp_path / "db", config=RetrievalConfig(lam=0.0)) as seg:
            seg.add_class("ice cave")  # the same vocabulary with and without examples
            without = seg.segment(image())
            seg.add_examples([image()], [np.ones((1, 250, 330), bool)], [["ice cave"]])
            result = seg.segment(image())
            np.testing.assert_array_equal(result.panoptic, without.panoptic)
            np.testing.assert_array_equal(result.semantic, without.semantic)
            assert all(s.evidence.retrieved_class == "ice cave" and not s.evidence.changed for s in result.segments)

    def test_remove_class(self, seg):
        seg.add_examples([image()], [np.ones((1, 250, 330), bool)], [["ice cave"]])
        assert (seg.segment(image()).semantic == seg.class_id("ice cave")).all()
        assert seg.remove_class("ice cave") == 1
        assert "ice cave" not in seg.classes
        np.testing.assert_array_equal(seg.segment(image()).panoptic, load_fixture("fcclip_resize").io["panoptic_seg"])

    def test_add_concept_adds_every_proposal_that_passes_both_thresholds(self, seg):
        from knnclip.engine.pipeline.stages import fcclip_input_for, valid_masks

        images = [image(), np.ascontiguousarray(image()[::-1])]
        nonempty = []
        for pixels in images:  # what passes at thresholds 0: every non-empty proposal
            x = fcclip_input_for(seg.models, pixels)
            masks = valid_masks(seg.models.fcclip.infer({"images": x.tensor})["mask_logits"][0], x.resized)
            nonempty.append(int((masks > 0).any(axis=(1, 2)).sum()))
        assert seg.add_concept("snowfield", images, mask_confidence=1.0, class_confidence=1.0) == []
        assert "snowfield" not in seg.db.classes
        added = seg.add_concept("snowfield", images, mask_confidence=0.0, class_confidence=0.0, thing=False)
        assert [sum(a.image == i for a in added) for i in range(2)] == nonempty and min(nonempty) > 1
        assert all(0 < a.mask_confidence <= 1 and 0 < a.class_confidence <= 1 for a in added)
        assert seg.db.classes["snowfield"] == len(added)
        strict = seg.add_concept("snowfield", images, mask_confidence=0.0, class_confidence=0.5)
        assert all(a.class_confidence >= 0.5 for a in strict) and len(strict) < len(added)

    def test_examples_are_checked(self, seg):
        with pytest.raises(InvalidInputError, match="masks must be"):
            seg.add_examples([image()], [np.ones((1, 10, 10), bool)], [["x"]])
        with pytest.raises(InvalidInputError, match="boolean"):
            seg.add_examples([image()], [np.ones((1, 250, 330), np.uint8)], [["x"]])
        with pytest.raises(InvalidInputError, match="1 masks but 2 labels"):
            seg.add_examples([image()], [np.ones((1, 250, 330), bool)], [["x", "y"]])
        assert seg.db.classes.get("x") is None


def test_backends_agree(models, tmp_path):
    """ONNX Runtime and torch give the same segmentation within tolerance."""
    results = {}
    for backend in ("onnxruntime", "torch"):
        with open_segmenter(models, tmp_path / f"db-{backend}", backend=backend) as seg:
            seg.add_examples([image()], [np.tri(250, 330, dtype=bool)[None]], [["triangle"]])
            results[backend] = seg.segment(image())
    a, b = results["onnxruntime"], results["torch"]
    assert (a.semantic == b.semantic).mean() > 0.999
    np.testing.assert_array_equal(a.panoptic, b.panoptic)


def test_threads_match_serial(seg):
    seg.add_examples([image()], [np.tri(250, 330, dtype=bool)[None]], [["triangle"]])
    inputs = [image(), image()[:, ::-1].copy(), image()[::-1].copy(), image()[:200]]
    serial = [seg.segment(x) for x in inputs]
    out: dict[int, Result] = {}

    def work(i: int) -> None:
        out[i] = seg.segment(inputs[i % len(inputs)])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        np.testing.assert_array_equal(out[i].semantic, serial[i % len(inputs)].semantic)
        np.testing.assert_array_equal(out[i].panoptic, serial[i % len(inputs)].panoptic)


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _encoded(kind: str) -> bytes:
    rgb = image()
    if kind == "cmyk":
        buffer = io.BytesIO()
        Image.fromarray(rgb).convert("CMYK").save(buffer, format="JPEG")
        return buffer.getvalue()
    if kind == "gray16":
        return _png(rgb[..., 0].astype(np.uint16) * 257)  # Pillow reads it as mode I;16
    if kind == "gray":
        return _png(rgb[..., 1])
    if kind == "tiny":
        return _png(rgb[:1, :1])
    if kind == "animated":
        buffer = io.BytesIO()
        frames = [Image.fromarray(rgb), Image.fromarray(rgb[::-1].copy())]
        frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
        return buffer.getvalue()
    raise AssertionError(kind)


class TestImages:
    """Catches images that crash the pipeline or are silently mangled."""

    def test_16_bit_gray_keeps_its_range(self):
        pixels = preprocess.load_image(_encoded("gray16"))
        np.testing.assert_array_equal(pixels[..., 0], image()[..., 0])
        assert (pixels[..., 0] == pixels[..., 2]).all()

    @pytest.mark.parametrize("kind", ["cmyk", "gray16", "gray", "tiny", "animated"])
    def test_unusual_images_are_segmented(self, seg, kind):
        result = seg.segment(_encoded(kind))
        h, w = preprocess.load_image(_encoded(kind)).shape[:2]
        assert result.semantic.shape == (h, w)

    @pytest.mark.parametrize(
        "data, match",
        [
            (b"", "not a readable image"),
            (b"not an image at all", "not a readable image"),
            (None, "not a readable image"),  # truncated PNG, filled in below
        ],
    )
    def test_broken_files_are_refused(self, seg, data, match):
        if data is None:
            data = _png(image())[:2000]
        with pytest.raises(InvalidInputError, match=match):
            seg.segment(data)

    def test_decompression_bomb_is_refused_before_decoding(self, seg, monkeypatch):
        monkeypatch.setattr(preprocess, "MAX_IMAGE_PIXELS", 100 * 100)
        with pytest.raises(InvalidInputError, match="larger than the limit"):
            seg.segment(_png(image()))

    def test_arrays_are_checked(self, seg):
        with pytest.raises(InvalidInputError, match="uint8"):
            seg.segment(image().astype(np.float32))
        with pytest.raises(InvalidInputError, match=r"\[H, W, 3\]"):
            seg.segment(np.zeros((4, 4, 4), np.uint8))

    def test_batched_models_give_the_per_image_results(self, seg):
        # Three images of different sizes share one FC-CLIP, one DINOv2 run and one search.
        images = [image(), image()[:200, 40:], np.ascontiguousarray(image()[::-1])]
        batched = seg.segment_batch(images, batch_size=3)
        for img, got in zip(images, batched, strict=True):
            assert isinstance(got, Result) and got.timings["batch_size"] == 3
            want = seg.segment(img)
            assert got.semantic.shape == want.semantic.shape
            assert (got.semantic == want.semantic).mean() > 0.999
            assert [s.name for s in got.segments] == [s.name for s in want.segments]
            assert got.timings["total"] >= got.timings["fcclip"] + got.timings["decode"]
        with pytest.raises(ValueError, match="batch_size"):
            seg.segment_batch(images, batch_size=0)

    def test_a_failure_in_a_batch_loses_nothing(self, seg):
        results = seg.segment_batch([image(), b"junk", image()[:100]])
        assert isinstance(results[0], Result) and isinstance(results[2], Result)
        assert isinstance(results[1], InvalidInputError)
        np.testing.assert_array_equal(results[0].panoptic, seg.segment(image()).panoptic)


def test_cli_segment_and_add_class(models, tmp_path, capsys):
    db = tmp_path / "db"
    open_segmenter(models, db).close()
    Image.fromarray(image()).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"broken")
    assert main(["add-class", "ice cave", "--thing", "--models", str(models), "--db", str(db)]) == 0
    code = main(
        [
            "segment",
            str(tmp_path / "a.png"),
            str(tmp_path / "b.png"),
            "--models",
            str(models),
            "--db",
            str(db),
            "--out",
            str(tmp_path / "out"),
            "--panoptic",
            "--overlay",
        ]
    )
    assert code == 1, "one image failed"
    assert "b.png" in capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "a.json").read_text())
    semantic = np.asarray(Image.open(tmp_path / "out" / "a.semantic.png"))
    assert semantic.shape == (250, 330)
    assert {report["classes"][c] for c in np.unique(semantic).tolist()} <= set(report["classes"]) - {None}
    assert (tmp_path / "out" / "a.overlay.png").is_file() and (tmp_path / "out" / "a.panoptic.png").is_file()


def test_cli_segment_searches_in_bf16_when_asked(models, tmp_path, monkeypatch):
    ov = pytest.importorskip("openvino", reason="bf16 search needs openvino")
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bfloat16 arithmetic")
    from knnclip.engine.database.bf16_search import Bf16SearchMirror

    db = tmp_path / "db"
    picture = image()
    quadrants = np.zeros((4, *picture.shape[:2]), bool)
    h, w = picture.shape[0] // 2, picture.shape[1] // 2
    for i, (top, left) in enumerate(((0, 0), (0, w), (h, 0), (h, w))):
        quadrants[i, top : top + h, left : left + w] = True
    with open_segmenter(models, db) as seg:
        names = [seg.db.vocabulary[class_id].name for class_id in seg.db.vocabulary][:4]
        seg.add_examples([picture, picture[:, ::-1].copy()], [quadrants, quadrants], [names, names[::-1]])
        assert len(seg.db) == 8, "the database needs entries for the search to matter"
    Image.fromarray(image()).save(tmp_path / "a.png")
    calls = []
    real = Bf16SearchMirror.search
    monkeypatch.setattr(Bf16SearchMirror, "search", lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
    labels = {}
    for search in ("fp32", "bf16"):
        out = tmp_path / search
        assert (
            main(
                [
                    "segment",
                    str(tmp_path / "a.png"),
                    "--models",
                    str(models),
                    "--db",
                    str(db),
                    "--backend",
                    "onnxruntime",
                    "--search",
                    search,
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        labels[search] = np.asarray(Image.open(out / "a.semantic.png"))
        assert bool(calls) == (search == "bf16")
    assert np.mean(labels["fp32"] == labels["bf16"]) >= 0.99


@pytest.fixture(scope="module")
def dynamic_models(tmp_path_factory, models) -> Path:
    """The same models with FC-CLIP exported with dynamic spatial axes."""
    import shutil

    fx = load_fixture("fcclip_resize")
    root = tmp_path_factory.mktemp("dynamic-models")
    shutil.copytree(models / "dinov2", root / "dinov2")
    export_fcclip_onnx(fx.model, root / "fcclip", size=None, seen_names=seen_names(fx), torch_weights=True)
    return root


@pytest.mark.parametrize(
    ("image_hw", "fed_hw"),
    [((300, 400), (288, 384)), ((400, 300), (384, 288)), ((350, 350), (288, 288)), ((250, 330), (288, 384))],
    ids=["landscape", "portrait", "square", "fixture"],
)
def test_each_image_reaches_fcclip_at_its_official_size(dynamic_models, tmp_path, image_hw, fed_hw):
    """FC-CLIP's test size: short side to min_size_test (288 here), padded to 32, whatever the aspect."""
    with open_segmenter(dynamic_models, tmp_path / "db") as seg:
        fed = []
        infer = seg.models.fcclip.infer
        seg.models.fcclip.infer = lambda feed: (fed.append(feed["images"].shape), infer(feed))[1]
        pixels = np.random.default_rng(0).integers(0, 255, (*image_hw, 3), dtype=np.uint8)
        result = seg.segment(pixels)
        assert fed == [(1, 3, *fed_hw)] and result.semantic.shape == image_hw
        fed.clear()
        other = np.random.default_rng(1).integers(0, 255, (300, 300, 3), dtype=np.uint8)
        batch = seg.segment_batch([pixels, other, pixels], batch_size=3)
        assert sorted(fed) == sorted(
            [(2, 3, *fed_hw), (1, 3, 288, 288)] if fed_hw != (288, 288) else [(3, 3, 288, 288)]
        )
        np.testing.assert_array_equal(batch[0].semantic, result.semantic)


def test_dynamic_graph_gives_the_official_fcclip_output(dynamic_models, tmp_path):
    fx = load_fixture("fcclip_resize")
    with open_segmenter(dynamic_models, tmp_path / "db") as seg:
        result = seg.segment(image())
    np.testing.assert_array_equal(result.panoptic, fx.io["panoptic_seg"])
