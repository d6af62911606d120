"""The continual-vocabulary protocol (``knnclip eval continual``).

A dataset's classes are split into T steps. At step t the step's classes join the vocabulary and
their training examples join the database; the validation split is then evaluated on the
classes seen so far (ground truth of later classes is ignored). Reported per step: mIoU over
the seen classes, over the old ones (steps before t) and the new ones (step t), the database's
size and bytes.

Forgetting is the drop, on the old classes, between what step t-1 measured and what the same
task measures with the step-t database: the step-t database is snapshotted, the step's classes
are removed from the copy, and step t-1's evaluation is repeated on it. Since adding classes never
changes the stored entries of the others, this drop is exactly zero for an exact (flat) index;
an approximate index whose structure depends on insertions (HNSW) may show some. The old
classes' mIoU in the grown vocabulary (``miou_old``) is reported beside it: it can fall because
the new classes compete for the same pixels, which is a harder task, not lost knowledge.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from knnclip.engine.database import Database
from knnclip.engine.errors import InvalidInputError
from knnclip.engine.eval.datasets import Dataset
from knnclip.engine.eval.evaluate import Progress, add_dataset, evaluate, json_score, semantic_summary

if TYPE_CHECKING:  # imported for its type only: the segmenter imports much of the engine
    from knnclip.engine.pipeline.segmenter import Segmenter


@dataclass(frozen=True)
class ContinualSettings:
    """``steps`` class groups, in dataset order or shuffled with ``seed``; ``forgetting``
    re-evaluates the previous step's task on each new database (one more evaluation per step)."""

    steps: int = 5
    shuffle: bool = False
    seed: int = 0
    forgetting: bool = True


def class_steps(num_classes: int, steps: int, shuffle: bool = False, seed: int = 0) -> list[list[int]]:
    """Split class indices 0..num_classes-1 into ``steps`` groups of near-equal size."""
    if not 1 <= steps <= num_classes:
        raise InvalidInputError(f"steps must be in [1, {num_classes}] (the number of classes), got {steps}")
    order = np.arange(num_classes)
    if shuffle:
        order = np.random.default_rng(seed).permutation(num_classes)
    return [sorted(int(c) for c in group) for group in np.array_split(order, steps)]


def _database_figures(db: Database) -> dict[str, Any]:
    stats = db.stats()
    return {
        "entries": stats["entries"],
        "classes": stats["classes"],
        "index": stats["index"],
        "storage": stats["storage"],
        "code_bytes_per_entry": stats["code_bytes_per_entry"],
        "code_bytes": stats["entries"] * stats["code_bytes_per_entry"],
        "disk_bytes": stats["disk_bytes"],
    }


def _mean(iou: np.ndarray, classes: list[int]) -> float | None:
    values = iou[classes] if classes else np.array([])
    return json_score(float(np.nanmean(values))) if np.isfinite(values).any() else None


def run_continual(
    seg: Segmenter,
    train: Dataset,
    val: Dataset,
    settings: ContinualSettings = ContinualSettings(),
    *,
    say: Callable[[str], None] = lambda _: None,
    progress: Callable[[str], Progress | None] = lambda _: None,
) -> dict[str, Any]:
    """Run the protocol with ``seg`` (whose database must start empty); returns the report."""
    if len(seg.db) or len(seg.db.vocabulary):
        raise InvalidInputError(f"{seg.db.path}: the continual protocol starts from an empty database")
    if [c.names for c in train.classes] != [c.names for c in val.classes]:
        raise InvalidInputError("the training and validation splits have different classes")
    groups = class_steps(len(train.classes), settings.steps, settings.shuffle, settings.seed)
    names = [c.name for c in train.classes]
    steps: list[dict[str, Any]] = []
    previous_iou: np.ndarray | None = None
    seen: list[int] = []
    scratch = Path(tempfile.mkdtemp(prefix="knnclip-continual-"))
    try:
        for t, group in enumerate(groups):
            start = time.perf_counter()
            old = list(seen)
            seen = sorted(seen + group)
            added = add_dataset(seg, train, classes=set(group), progress=progress(f"step {t + 1} add"))
            ev = evaluate(seg, val, restrict=seen, panoptic=False, progress=progress(f"step {t + 1} eval"))
            iou = ev.confusion.iou()
            summary = semantic_summary(ev, val.classes)
            step: dict[str, Any] = {
                "step": t + 1,
                "classes": [names[c] for c in group],
                "seen": len(seen),
                "added": {k: round(v, 3) if isinstance(v, float) else v for k, v in added.items()},
                "miou": _mean(iou, seen),
                "miou_old": _mean(iou, old),
                "miou_new": _mean(iou, group),
                "pixel_accuracy": summary["pixel_accuracy"],
                "iou": {names[c]: json_score(iou[c]) for c in seen},
                "database": _database_figures(seg.db),
            }
            if settings.forgetting and previous_iou is not None:
                step["forgetting"] = _forgetting(seg, val, old, group, previous_iou, scratch / f"step{t + 1}")
            step["seconds"] = round(time.perf_counter() - start, 3)
            steps.append(step)
            say(_step_line(step))
            previous_iou = iou
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    drops = [s["forgetting"]["miou_drop"] for s in steps if "forgetting" in s]
    return {
        "protocol": "continual",
        "dataset": {
            "train": train.key,
            "val": val.key,
            "train_images": len(train),
            "val_images": len(val),
            "classes": len(names),
        },
        "settings": asdict(settings),
        "retrieval": seg.config.to_json(),
        "steps": steps,
        "final_miou": steps[-1]["miou"],
        "mean_forgetting": json_score(float(np.mean(drops))) if drops else None,
        "max_forgetting": json_score(float(np.max(drops))) if drops else None,
        "zero_forgetting": all(s["forgetting"]["identical"] for s in steps if "forgetting" in s) if drops else None,
    }


def _forgetting(
    seg: Segmenter, val: Dataset, old: list[int], new: list[int], previous_iou: np.ndarray, scratch: Path
) -> dict[str, Any]:
    """Repeat the previous step's evaluation on a copy of the current database without the new
    classes; compare IoU on the old classes."""
    seg.db.snapshot(scratch)
    with Database.open(scratch) as copy:
        for c in new:
            copy.remove_class(val.classes[c].name)
        again = evaluate(seg.with_database(copy), val, restrict=old, panoptic=False).confusion.iou()
    before, now = previous_iou[old], again[old]
    both = np.isfinite(before) & np.isfinite(now)
    drops = before[both] - now[both]
    return {
        "miou_before": _mean(previous_iou, old),
        "miou_again": _mean(again, old),
        "miou_drop": json_score(float(np.nanmean(before) - np.nanmean(now))) if both.any() else 0.0,
        "max_class_drop": json_score(float(drops.max())) if drops.size else 0.0,
        "identical": bool(np.array_equal(before, now, equal_nan=True)),
    }


def _step_line(step: dict[str, Any]) -> str:
    fmt = lambda v: "  -  " if v is None else f"{v:.3f}"  # noqa: E731
    line = (
        f"step {step['step']}: +{len(step['classes'])} classes ({step['seen']} seen), "
        f"+{step['added']['entries']} entries ({step['database']['entries']} in all); "
        f"mIoU {fmt(step['miou'])}, old {fmt(step['miou_old'])}, new {fmt(step['miou_new'])}"
    )
    if "forgetting" in step:
        line += f"; forgetting {step['forgetting']['miou_drop']:.6f}"
    return line
