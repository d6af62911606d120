"""Typed manifests (knnclip.engine.artifact): every key the run time reads is checked when the
manifest is read, and a missing or mistyped one is an ArtifactCorruptError that names it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from knnclip.engine.artifact import (
    DINOv2Manifest,
    FCCLIPImageManifest,
    FCCLIPTextManifest,
    Manifest,
    read_manifest,
    write_manifest,
)
from knnclip.engine.errors import ArtifactCorruptError


def body_of(directory: Path) -> dict:
    return read_manifest(directory, verify_files=False).to_json()


def test_each_kind_reads_into_its_own_type(demo_models: Path) -> None:
    image = read_manifest(demo_models / "fcclip" / "image")
    text = read_manifest(demo_models / "fcclip" / "text")
    dinov2 = read_manifest(demo_models / "dinov2")
    assert isinstance(image, FCCLIPImageManifest) and isinstance(text, FCCLIPTextManifest)
    assert isinstance(dinov2, DINOv2Manifest)
    raw = json.loads((demo_models / "fcclip" / "image" / "manifest.json").read_text())
    assert (
        image.pixel_mean == tuple(raw["preprocessing"]["mean"])
        and image.min_size == raw["preprocessing"]["min_size_test"]
    )
    assert image.void_embedding == tuple(raw["head"]["void_embedding"]) and image.alpha == raw["inference"]["alpha"]
    assert text.templates == tuple(
        json.loads((demo_models / "fcclip" / "text" / "manifest.json").read_text())["templates"]
    )
    assert dinov2.mean == (0.485, 0.456, 0.406) and dinov2.std == (0.229, 0.224, 0.225)  # ImageNet's, as exported
    assert image.files["model"].name == raw["files"]["model"]["name"]


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("head", "clip_logit_scale"), None, "manifest 'head' lacks 'clip_logit_scale'"),
        (("head", "clip_logit_scale"), "4.6", "manifest 'head' 'clip_logit_scale' is str, expected float"),
        (("preprocessing", "mean"), [1, 2], "'mean' is not a list of 3 numbers"),
        (("inference",), None, "manifest lacks 'inference'"),
        (("seen_names",), [1, 2], "'seen_names' holds something other than names"),
        (("input_size",), [0, 5], "'input_size' is not \\[height, width\\]"),
        (("precision",), True, "'precision' is bool, expected str"),
    ],
)
def test_a_missing_or_mistyped_key_is_named(demo_models: Path, path: tuple, value, message: str) -> None:
    body = body_of(demo_models / "fcclip" / "image")
    parent = body
    for key in path[:-1]:
        parent = parent[key]
    if value is None:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    with pytest.raises(ArtifactCorruptError, match=message):
        Manifest.from_json(body, "image/manifest.json")


def test_a_mistyped_manifest_on_disk_is_refused_on_read(demo_models: Path, tmp_path: Path) -> None:
    """Written with a valid self-hash (as a hand edit that recomputes it would be): still refused, by key."""
    from knnclip.engine.fsutil import json_content_hash

    art = tmp_path / "dinov2"
    shutil.copytree(demo_models / "dinov2", art)
    raw = json.loads((art / "manifest.json").read_text())
    raw["inputs"][0]["preprocessing"]["std"] = "0.229"
    del raw["manifest_sha256"]
    raw["manifest_sha256"] = json_content_hash(raw)
    (art / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactCorruptError, match="'preprocessing' 'std' is str, expected list"):
        read_manifest(art)


def test_an_exporter_cannot_write_what_the_run_time_would_refuse(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"graph")
    body = {
        "kind": "dinov2-keys",
        "files": {"model": "model.onnx"},
        "inputs": [{"name": "images", "shape": ["batch", 3, 14, 14], "dtype": "float32"}],
        "outputs": [],
        "input_size": [14, 14],
    }
    with pytest.raises(ArtifactCorruptError, match="the first input lacks 'preprocessing'"):
        write_manifest(tmp_path, body)
    assert not (tmp_path / "manifest.json").exists()


def test_dinov2s_normalisation_is_read_from_its_manifest(demo_models: Path, tmp_path: Path) -> None:
    from knnclip.engine.pipeline.models import ModelSet
    from knnclip.engine.pipeline.preprocess import dinov2_input

    models = tmp_path / "models"
    shutil.copytree(demo_models, models)
    body = body_of(models / "dinov2")
    body["inputs"][0]["preprocessing"].update(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    for generated in ("format", "format_version", "created", "knnclip_version"):
        body.pop(generated)
    body["files"] = {role: record["name"] for role, record in body["files"].items()}
    write_manifest(models / "dinov2", body)
    model_set = ModelSet(models, "onnxruntime", "cpu")
    try:
        assert (model_set.dinov2_mean, model_set.dinov2_std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    finally:
        model_set.close()
    grey = np.full((28, 28, 3), 191, np.uint8)  # 0.749 after /255: (0.749 - 0.5) / 0.25 = 0.996
    x = dinov2_input(grey, (14, 14), model_set.dinov2_mean, model_set.dinov2_std)
    np.testing.assert_allclose(x, (191 / 255 - 0.5) / 0.25, rtol=1e-6)
