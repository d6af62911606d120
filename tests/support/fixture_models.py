"""The official fixtures' models exported to ONNX (with torch weights beside them), and a
segmenter over them whose vocabulary is the fixture's: what the pipeline's tests run on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from knnclip.engine.pipeline.segmenter import Segmenter
from tests.support.fcclip_helpers import load_fixture
from tests.support.fixture_files import fixture_dir


def export_fixture_models(root: Path) -> Path:
    """The resize fixture's FC-CLIP (288x384) and the DINOv2 fixture, exported with torch weights."""
    from knnclip.export.dinov2 import load_dinov2
    from knnclip.export.dinov2.onnx import export_dinov2_onnx
    from knnclip.export.fcclip.onnx import export_fcclip_onnx

    fx = load_fixture("fcclip_resize")
    export_fcclip_onnx(fx.model, root / "fcclip", size=fx.padded, seen_names=seen_names(fx), torch_weights=True)
    dino_dir = fixture_dir("dinov2")
    dinov2 = load_dinov2(dino_dir / "checkpoint.pth", json.loads((dino_dir / "config.json").read_text()))
    export_dinov2_onnx(dinov2, root / "dinov2", size=(224, 224), torch_weights=True)
    return root


def seen_names(fx) -> list[str]:
    """The fixture's training vocabulary: every synonym of its classes marked as overlapping."""
    classes = fx.config["classes"]
    pairs = zip(classes["names_with_synonyms"], classes["category_overlapping_mask"], strict=True)
    return [n for label, seen in pairs if seen for n in label.split(",")]


def open_segmenter(models: Path, db: Path, backend: str = "onnxruntime", **kw) -> Segmenter:
    """A segmenter whose vocabulary is the fixture's, in its order (class id = fixture index)."""
    seg = Segmenter.from_dir(models, db, backend=backend, device="cpu", text_cache=None, **kw)
    if len(seg.db.vocabulary) == 0:
        fx = load_fixture("fcclip_resize")
        for label, thing in zip(fx.class_names, fx.is_thing, strict=True):
            name, *synonyms = label.split(",")
            seg.add_class(name, synonyms, thing=thing)
    return seg


def image() -> np.ndarray:
    return load_fixture("fcclip_resize").io["image_uint8"]
