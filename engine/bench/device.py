"""The device pipeline against the host pipeline, on the same models, database and images: what
``benchmarks/gpu_check.py`` runs on a GPU (and its ``--dry-run`` on the CPU, with torch tensors
standing in for the device).

The host pipeline is the reference: ONNX Runtime on the CPU, NumPy post-processing. The device
pipeline opens the models with ``backend`` on ``device`` and keeps its arrays in torch on
``arrays_device`` (the models' GPU; ``"cpu"`` for a dry run). Reported per image: semantic
agreement, whether the panoptic segments are the same (class, area), the largest difference of
the instance scores, the device pipeline's per-stage times and the bytes it moved between host
and device.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SEMANTIC_AGREEMENT = 0.999  # the fraction of pixels the device pipeline must decide as the host's
INSTANCE_SCORE_TOLERANCE = 1e-3


def example_database(models_dir: Path, path: Path, images: int = 4, seed: int = 11) -> Path:
    """A flat database of the demo dataset's labelled masks embedded by ``models_dir``'s DINOv2."""
    from knnclip.engine.demo.synthetic import make_split
    from knnclip.engine.pipeline.segmenter import Segmenter

    samples = make_split(images, seed=seed)
    with Segmenter.from_dir(models_dir, path, backend="onnxruntime", device="cpu", text_cache=None) as seg:
        seg.add_examples([s.image for s in samples], [s.masks for s in samples], [s.names for s in samples])
    return path


def _segments(result: Any) -> list[tuple[int, int, bool]]:
    return [(s.class_id, s.area, s.isthing) for s in result.segments]


def compare_pipelines(
    models_dir: Path,
    images: Sequence[np.ndarray],
    *,
    backend: str,
    device: str,
    arrays_device: str,
    database: Path | None = None,
    warmup: int = 1,
) -> dict[str, Any]:
    """Host and device pipelines on ``images`` (the first ``warmup`` untimed): agreement, stage
    times and bytes moved; ``ok`` when every image meets :data:`SEMANTIC_AGREEMENT`, the same
    segments and :data:`INSTANCE_SCORE_TOLERANCE`."""
    from knnclip.engine.pipeline.arrays import TorchArrays
    from knnclip.engine.pipeline.segmenter import Segmenter

    with tempfile.TemporaryDirectory() as tmp:
        db = database or example_database(models_dir, Path(tmp) / "db")
        host = Segmenter.from_dir(models_dir, db, backend="onnxruntime", device="cpu", read_only=True, text_cache=None)
        xp = TorchArrays(arrays_device)
        dev = Segmenter.from_dir(
            models_dir, db, backend=backend, device=device, read_only=True, text_cache=None, arrays=xp
        )
        try:
            rows, stages, moved = [], [], []
            for i, image in enumerate(images):
                want = host.segment(image, instance=True)
                before = xp.transfers.snapshot()
                start = time.perf_counter()
                got = dev.segment(image, instance=True)
                elapsed = (time.perf_counter() - start) * 1e3
                if i < warmup:
                    continue
                moved.append(xp.transfers.since(before))
                stages.append({**got.timings, "wall": elapsed})
                rows.append(_agreement(want, got))
            sessions = {
                part: repr(s) for part, s in zip(("fcclip", "text", "dinov2"), dev.models.sessions(), strict=True)
            }
        finally:
            host.close()
            dev.close()
    ok = bool(rows) and all(r["ok"] for r in rows)
    return {
        "ok": ok,
        "arrays": repr(xp),
        "sessions": sessions,
        "images": rows,
        "stages_ms": {k: float(np.median([s.get(k, 0.0) for s in stages])) for k in stages[0]} if stages else {},
        "bytes_moved_per_image": median_bytes(moved),
    }


def _agreement(want: Any, got: Any) -> dict[str, Any]:
    semantic = float(np.mean(want.semantic == got.semantic))
    same_segments = _segments(want) == _segments(got)
    paired = [(a, b) for a, b in zip(want.instances, got.instances, strict=False) if a.class_id == b.class_id]
    same_instances = len(want.instances) == len(got.instances) == len(paired)
    score_diff = max((abs(a.score - b.score) for a, b in paired), default=0.0)
    return {
        "semantic_agreement": semantic,
        "same_segments": same_segments,
        "segments": len(want.segments),
        "instances": len(want.instances),
        "same_instance_classes": same_instances,
        "max_instance_score_diff": float(score_diff),
        "ok": semantic >= SEMANTIC_AGREEMENT
        and same_segments
        and same_instances
        and score_diff <= INSTANCE_SCORE_TOLERANCE,
    }


def median_bytes(moved: list[dict[str, dict[str, int]]]) -> dict[str, dict[str, float]]:
    """Per direction and kind, the median bytes over the images (a kind missing from an image is 0)."""
    out: dict[str, dict[str, float]] = {}
    for direction in ("to_device", "to_host"):
        kinds = sorted({k for m in moved for k in m.get(direction, {})})
        out[direction] = {k: float(np.median([m.get(direction, {}).get(k, 0) for m in moved])) for k in kinds}
    return out
