"""The OpenVINO backend on the demo's models: fp32 against ONNX Runtime to fp32 tolerance, bf16
within its documented tolerance, the Session contract's input checks, and the compiled-model cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from knnclip.engine.artifact import artifact_digest, read_manifest
from knnclip.engine.backends import open_session
from knnclip.engine.errors import InvalidInputError

# Relative L2 error per output against ONNX Runtime fp32 (docs/backends.md).
FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 5e-2


@pytest.fixture(scope="module")
def models(demo_models) -> Path:
    return demo_models


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KNNCLIP_ENGINE_CACHE", str(tmp_path / "engines"))


def feed_for(session, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in session.inputs:
        if spec.dtype.kind in "iu":
            feed[spec.name] = rng.integers(1, 200, [d if isinstance(d, int) else 2 for d in spec.shape]).astype(
                spec.dtype
            )
        else:
            shape = [d if isinstance(d, int) else {"batch": 2}.get(d, 96 if "height" in d else 128) for d in spec.shape]
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feed


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / (np.linalg.norm(b) or 1.0))


@pytest.mark.parametrize("part", ["dinov2", "fcclip/image", "fcclip/text"])
def test_fp32_matches_onnxruntime(models, part):
    reference = open_session(models / part, "onnxruntime", "cpu")
    feed = feed_for(reference)
    want = reference.infer(feed)
    with open_session(models / part, "openvino", "cpu") as session:
        assert "fp32" in repr(session)
        got = session.infer(feed)
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype
        assert relative_error(got[name], want[name]) <= FP32_TOLERANCE, name


def test_bf16_within_its_tolerance(models):
    import openvino as ov

    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bfloat16 arithmetic")
    reference = open_session(models / "dinov2", "onnxruntime", "cpu")
    feed = feed_for(reference)
    want = reference.infer(feed)["keys"]
    with open_session(models / "dinov2", "openvino-bf16", "cpu") as session:
        got = session.infer(feed)["keys"]
    error = relative_error(got, want)
    assert 0 < error <= BF16_TOLERANCE, error  # bf16 really ran (not fp32) and stayed close


def test_inputs_are_checked_and_the_compiled_model_is_cached(models, tmp_path):
    with open_session(models / "dinov2", "openvino", "cpu") as session:
        with pytest.raises(InvalidInputError, match="must be float32"):
            session.infer({"images": np.zeros((1, 3, 112, 112), np.float64)})
        with pytest.raises(InvalidInputError, match="inputs are"):
            session.infer({"pixels": np.zeros((1, 3, 112, 112), np.float32)})
    assert any((tmp_path / "engines" / "openvino").iterdir()), "compiled models are cached on disk"


def test_the_segmenter_runs_on_openvino(models, tmp_path):
    from knnclip.engine import Segmenter
    from knnclip.engine.demo.synthetic import make_split

    samples = make_split(3, seed=1, size=(96, 128))
    with Segmenter.from_dir(models, tmp_path / "db", backend="openvino", device="cpu", text_cache=None) as seg:
        seg.add_examples([s.image for s in samples], [s.masks for s in samples], [s.names for s in samples])
        with Segmenter.from_dir(models, seg.db, backend="onnxruntime", device="cpu", text_cache=None) as ort:
            a, b = seg.segment(samples[0].image), ort.segment(samples[0].image)
    assert (a.semantic == b.semantic).mean() >= 0.999


def test_search_precision_applies_where_the_segmenter_opens_the_database(models, tmp_path):
    from knnclip.engine import Database, Segmenter

    Segmenter.from_dir(models, tmp_path / "db", device="cpu", text_cache=None).close()  # creates it
    with Database.open(tmp_path / "db") as db, pytest.raises(InvalidInputError, match="search="):
        Segmenter.from_dir(models, db, device="cpu", search="bf16", text_cache=None)


def test_an_engine_cache_that_cannot_be_made_only_costs_the_compiled_model_cache(models, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("KNNCLIP_ENGINE_CACHE", str(blocker / "engines"))
    with caplog.at_level("WARNING"), open_session(models / "dinov2", "openvino", "cpu") as session:
        got = session.infer(feed_for(session))["keys"]
    assert np.isfinite(got).all() and "no OpenVINO model cache" in caplog.text


def test_bf16_refuses_the_gather_graph_at_open_with_the_fix(models):
    from knnclip.engine.errors import BackendUnavailableError

    assert read_manifest(models / "fcclip" / "image").body.get("sampling", "gather") == "gather"
    with pytest.raises(BackendUnavailableError, match="--sampling grid"):
        open_session(models / "fcclip" / "image", "openvino-bf16", "cpu")


def test_a_twin_artefact_with_other_weights_gets_its_own_compiled_model(tmp_path):
    """Same graph, same inputs and outputs, other weights: each must run its own weights, not the
    compiled blob of the other (the cache is keyed by the artefact's digest)."""
    import json

    import torch

    from knnclip.export.dinov2 import load_dinov2
    from knnclip.export.dinov2.onnx import export_dinov2_onnx
    from tests.support.fixture_files import fixture_dir

    config = json.loads((fixture_dir("dinov2") / "config.json").read_text())
    first = load_dinov2(fixture_dir("dinov2") / "checkpoint.pth", config)
    twin = load_dinov2(fixture_dir("dinov2") / "checkpoint.pth", config)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
    images = np.random.default_rng(0).standard_normal((1, 3, 56, 56)).astype(np.float32)
    for name, model in (("first", first), ("twin", twin)):
        export_dinov2_onnx(model, tmp_path / name, size=56)
    outputs = {}
    for name in ("first", "twin"):
        with open_session(tmp_path / name, "onnxruntime", "cpu") as reference:
            want = reference.infer({"images": images})["keys"]
        with open_session(tmp_path / name, "openvino", "cpu") as session:
            outputs[name] = session.infer({"images": images})["keys"]
        assert relative_error(outputs[name], want) <= FP32_TOLERANCE, name
    assert relative_error(outputs["twin"], outputs["first"]) > 0.1
    # OpenVINO's own cache key may not cover every weight, so each artefact has a folder of its own
    digests = {artifact_digest(read_manifest(tmp_path / name))[:32] for name in ("first", "twin")}
    cached = {p.name for p in (tmp_path / "engines" / "openvino").iterdir() if any(p.iterdir())}
    assert len(digests) == 2 and digests <= cached, (digests, cached)
