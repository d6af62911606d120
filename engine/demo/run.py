"""``knnclip demo``: the whole engine on a synthetic dataset, on a CPU, with no downloads.

1. Build reduced FC-CLIP and DINOv2 models with seeded random weights (or load real
   checkpoints) and export them to ONNX (verified in ONNX Runtime).
2. Make a synthetic labelled dataset (``knnclip.engine.demo.synthetic``): a training and a
   validation split.
3. Build a database from the training split's masks of the base classes; segment the
   validation split.
4. Add the training examples of two new classes; segment the validation split again.
5. Print IoU per class before and after, what retrieval changed, per-stage latency; write
   overlay PNGs.

With random weights FC-CLIP's own predictions are noise; what the demo shows is the machinery
and that retrieval over a database of examples recognises classes nothing was trained on.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from knnclip.engine.config import RetrievalConfig
from knnclip.engine.demo.dataset import SyntheticDataset
from knnclip.engine.demo.models import DINOV2_SIZE, seeded_dinov2, seeded_fcclip
from knnclip.engine.demo.synthetic import CLASSES, IMAGE_SIZE, Sample, class_index
from knnclip.engine.errors import needs_extra
from knnclip.engine.eval.evaluate import Evaluation, evaluate

if TYPE_CHECKING:  # imported for its type only: the segmenter imports much of the engine
    from knnclip.engine.pipeline.results import Result
    from knnclip.engine.pipeline.segmenter import Segmenter

BASE_CLASSES = ("sky", "grass", "sand", "ball", "box", "tree")
NEW_CLASSES = ("water", "star")
_MODELS_VERSION = 2  # bump when the seeded demo models change


@dataclass(frozen=True)
class DemoSettings:
    out: Path
    train: int = 48
    val: int = 16
    seed: int = 0
    fcclip: str | None = None
    fcclip_config: dict[str, Any] | None = None
    dinov2: str | None = None
    dinov2_config: dict[str, Any] | str | None = None
    overlays: int = 4
    sampling: str = "gather"  # FC-CLIP's deformable attention: "grid" for OpenVINO bf16 (docs/backends.md)
    backend: str = "auto"
    search: str = "fp32"


def build_models(settings: DemoSettings, say: Callable[[str], None]) -> Path:
    """Export the demo's models (seeded, or the given checkpoints) under ``out/models``; reuse
    them when an earlier run made the same ones."""
    try:
        import torch  # noqa: F401

        from knnclip.export.dinov2.onnx import export_dinov2_onnx
        from knnclip.export.fcclip.onnx import export_fcclip_onnx
    except ImportError as exc:
        raise needs_extra(f"the demo builds its models with torch and onnx ({exc}); it", "export") from None
    models = settings.out / "models"
    signature = {
        "version": _MODELS_VERSION,
        "fcclip": settings.fcclip,
        "fcclip_config": settings.fcclip_config,
        "dinov2": settings.dinov2,
        "dinov2_config": settings.dinov2_config,
        "sampling": settings.sampling,
    }
    stamp = models / "demo-models.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == signature:
        say(f"models: reusing {models}")
        return models
    shutil.rmtree(models, ignore_errors=True)
    start = time.perf_counter()
    if settings.fcclip:
        from knnclip.export.fcclip import load_fcclip

        fcclip, tokenizer = load_fcclip(settings.fcclip, settings.fcclip_config), "clip-bpe"
    else:
        fcclip, tokenizer = seeded_fcclip(), "bytes"
    if settings.dinov2:
        from knnclip.export.dinov2 import load_dinov2

        dinov2 = load_dinov2(settings.dinov2, settings.dinov2_config)
        dinov2_size = DINOV2_SIZE
    else:
        dinov2, dinov2_size = seeded_dinov2(), DINOV2_SIZE
    # A real checkpoint was trained on COCO panoptic (the exporter's default); the seeded model's
    # "training vocabulary" is the demo's base classes.
    seen = None if settings.fcclip else list(BASE_CLASSES)
    export_fcclip_onnx(
        fcclip, models / "fcclip", size=IMAGE_SIZE, tokenizer=tokenizer, seen_names=seen, sampling=settings.sampling
    )
    export_dinov2_onnx(dinov2, models / "dinov2", size=dinov2_size)
    stamp.write_text(json.dumps(signature))
    say(f"models: exported FC-CLIP and DINOv2 to ONNX in {time.perf_counter() - start:.1f} s ({models})")
    return models


def build_database(models: Path, path: Path, samples: list[Sample], text_cache: Path | None = None) -> Path:
    """A database at ``path`` holding every mask of ``samples`` under its class: what tests and
    benchmarks segment the demo's images against."""
    from knnclip.engine.pipeline.segmenter import Segmenter

    with Segmenter.from_dir(models, path, device="cpu", text_cache=text_cache) as seg:
        seg.add_examples([s.image for s in samples], [s.masks for s in samples], [s.names for s in samples])
    return path


def _add_split(seg: Segmenter, samples: list[Sample], classes: tuple[str, ...]) -> int:
    """Add the masks of ``classes`` in ``samples`` to the database; returns how many were added."""
    thing = {c.name: c.thing for c in CLASSES}
    for name in classes:
        seg.add_class(name, thing=thing[name])
    images, masks, labels = [], [], []
    for s in samples:
        keep = [i for i, n in enumerate(s.names) if n in classes]
        if keep:
            images.append(s.image)
            masks.append(s.masks[keep])
            labels.append([s.names[i] for i in keep])
    return len(seg.add_examples(images, masks, labels))


def run_demo(settings: DemoSettings, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo; returns what it printed as data (IoU per class before/after, changes, timings)."""
    from PIL import Image

    from knnclip.engine.pipeline.segmenter import Segmenter
    from knnclip.engine.render import save_png

    settings.out.mkdir(parents=True, exist_ok=True)
    if not settings.fcclip or not settings.dinov2:
        say(
            "note: the models' weights are RANDOM (seeded) unless you pass real checkpoints: "
            "knnclip demo --fcclip fcclip_cocopan.pth --dinov2 dinov2_vitg14_reg4_pretrain.pth"
        )
    models = build_models(settings, say)
    train = SyntheticDataset("train", settings.train, seed=settings.seed).samples
    val = SyntheticDataset("val", settings.val, seed=settings.seed + 1)
    db_path = settings.out / "demo.db"
    shutil.rmtree(db_path, ignore_errors=True)  # each run starts from an empty database
    with Segmenter.from_dir(
        models,
        db_path,
        config=RetrievalConfig(),
        text_cache=settings.out / "cache",
        backend=settings.backend,
        search=settings.search,
    ) as seg:
        say(f"backends: {', '.join(f'{k}={v}' for k, v in seg.models.backends.items())}")
        runtime = {part: getattr(seg.models, part).backend for part in ("fcclip", "text", "dinov2")}
        runtime["search"] = seg.db.stats()["search"]
        start = time.perf_counter()
        n_base = _add_split(seg, train, BASE_CLASSES)
        say(
            f"database: {n_base} masks of {len(BASE_CLASSES)} base classes from {len(train)} training images "
            f"in {time.perf_counter() - start:.1f} s"
        )
        before = evaluate(seg, val)
        start = time.perf_counter()
        n_new = _add_split(seg, train, NEW_CLASSES)
        elapsed = time.perf_counter() - start
        say(
            f"database: + {n_new} masks of the new classes {', '.join(NEW_CLASSES)} in {elapsed:.1f} s "
            f"({len(seg.db)} entries in all)"
        )
        results: list[Result] = []
        after = evaluate(seg, val, on_result=lambda i, r: results.append(r))
        overlay_dir = settings.out / "overlays"
        overlay_dir.mkdir(exist_ok=True)
        for i, r in enumerate(results[: settings.overlays]):  # labelled, with what retrieval said
            save_png(Image.fromarray(r.plot(val.image(i), evidence=True)), overlay_dir / f"val_{i:02d}.png")
    report = {**_report(before, after, results), "runtime": runtime}
    say(_format(report, overlay_dir))
    (settings.out / "demo.json").write_text(json.dumps(report, indent=1))
    return report


def _report(before_eval: Evaluation, after_eval: Evaluation, results: list[Result]) -> dict[str, Any]:
    before, after = before_eval.confusion, after_eval.confusion
    iou_b, iou_a = before.iou(), after.iou()
    segments = [s for r in results for s in r.segments]
    return {
        "classes": [
            {
                "name": c.name,
                "new": c.name in NEW_CLASSES,
                "iou_before": None if np.isnan(iou_b[i]) else float(iou_b[i]),
                "iou_after": None if np.isnan(iou_a[i]) else float(iou_a[i]),
            }
            for i, c in enumerate(CLASSES)
        ],
        "miou_before": before.miou(),
        "miou_after": after.miou(),
        "miou_new_before": float(np.nanmean([iou_b[class_index(n)] for n in NEW_CLASSES])),
        "miou_new_after": float(np.nanmean([iou_a[class_index(n)] for n in NEW_CLASSES])),
        "pixel_accuracy_before": before.pixel_accuracy(),
        "pixel_accuracy_after": after.pixel_accuracy(),
        "segments": len(segments),
        "segments_changed_by_retrieval": sum(s.evidence.changed for s in segments),
        "latency_ms_median": {k: float(np.median(v)) for k, v in after_eval.timings_ms.items()},
    }


def _format(report: dict[str, Any], overlay_dir: Path) -> str:
    lines = ["", "IoU per class on the validation split (before / after adding the new classes' examples):", ""]
    lines.append(f"  {'class':<8} {'before':>8} {'after':>8}")
    for c in report["classes"]:
        fmt = lambda v: "   -" if v is None else f"{v:8.3f}"  # noqa: E731
        lines.append(f"  {c['name']:<8} {fmt(c['iou_before'])} {fmt(c['iou_after'])}{'   (new)' if c['new'] else ''}")
    lines += [
        f"  {'mIoU':<8} {report['miou_before']:8.3f} {report['miou_after']:8.3f}",
        f"  {'new':<8} {report['miou_new_before']:8.3f} {report['miou_new_after']:8.3f}   (mIoU of the new classes)",
        "",
        f"retrieval changed the class of {report['segments_changed_by_retrieval']} of {report['segments']} "
        "panoptic segments (after)",
        "median latency per image (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in report["latency_ms_median"].items()),
        f"overlays: {overlay_dir}",
    ]
    return "\n".join(lines)
