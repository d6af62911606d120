"""What a segmentation returns: the semantic map, the panoptic segments and, per segment, the
retrieval evidence behind its class."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Evidence:
    """What retrieval said about one query (and the segment it made)."""

    base_class: str
    retrieved_class: str | None
    retrieval_confidence: float
    neighbours: tuple[tuple[str, float], ...]  # (class, cosine similarity), nearest first
    changed: bool


@dataclass(frozen=True)
class PanopticSegment:
    id: int
    class_id: int
    name: str
    score: float
    area: int
    is_thing: bool
    evidence: Evidence


def bbox(mask: np.ndarray) -> list[int]:
    """COCO ``[x, y, width, height]`` of a boolean mask ([0, 0, 0, 0] when empty).

    >>> bbox(np.array([[0, 0, 0], [0, 1, 1]], bool))
    [1, 1, 2, 1]
    """
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


@dataclass(frozen=True)
class InstanceMask:
    """One scored instance (FC-CLIP's instance inference): database class id and name, score,
    and the boolean mask [H, W] at the image's size."""

    class_id: int
    name: str
    score: float
    mask: np.ndarray


@dataclass
class Result:
    """The segmentation of one image.

    ``semantic`` [H, W] int32 holds database class ids (``classes`` names them); ``panoptic``
    [H, W] int32 holds segment ids (0 = void), described by ``segments``. ``timings`` are
    milliseconds per stage. ``instances`` (with ``instance=True``) are scored instance masks,
    best first.
    """

    semantic: np.ndarray
    panoptic: np.ndarray
    segments: list[PanopticSegment]
    classes: dict[int, str]
    timings: dict[str, float] = field(default_factory=dict)
    name: str = ""
    instances: list[InstanceMask] = field(default_factory=list)

    # formats and render draw and write results: they import this module, so these import them late.
    def to_json(self) -> dict[str, Any]:
        """The result record of :mod:`knnclip.engine.formats`, what ``knnclip segment`` writes."""
        from knnclip.engine.formats import result_record

        return result_record(self)

    def plot(self, image: np.ndarray, *, evidence: bool = False) -> np.ndarray:
        """``image`` (the one segmented, uint8 [H, W, 3]) with each segment filled, outlined and
        labelled with its class and score -> uint8 RGB; ``evidence`` adds, under it, what
        retrieval said about each segment (:func:`knnclip.engine.render.plot`)."""
        from knnclip.engine.render import plot

        return plot(image, self, evidence=evidence)

    def save(
        self,
        directory: str | os.PathLike[str],
        formats: Sequence[str] = ("json", "label-png"),
        *,
        image: np.ndarray | None = None,
        stem: str | None = None,
    ) -> Path:
        """Write the files ``knnclip segment`` writes for this result into ``directory``: the
        ``formats`` of :data:`knnclip.engine.formats.FORMATS` (the COCO files with this result's
        classes as categories), the panoptic label PNG, and with ``image`` the labelled overlay.
        ``stem`` names the files (default: the image's file name without its suffix, else
        ``result``). Returns the directory."""
        from knnclip.engine.formats import ResultWriter

        out = Path(directory)
        writer = ResultWriter(out, formats, panoptic=True, overlay=image is not None)
        writer.write(stem or Path(self.name).stem or "result", self, image)
        writer.close()
        return out

    def to_supervision(self) -> Any:
        """The panoptic segments as ``supervision.Detections`` (Roboflow's supervision, the
        ``supervision`` extra): boxes, masks, class ids, scores, and ``data["class_name"]``."""
        try:
            import supervision as sv
        except ImportError:
            from knnclip.engine.errors import needs_extra

            raise needs_extra("Result.to_supervision (Roboflow's supervision)", "supervision") from None
        masks = (
            np.stack([self.panoptic == s.id for s in self.segments])
            if self.segments
            else np.zeros((0, *self.panoptic.shape), bool)
        )
        boxes = np.array([_xyxy(m) for m in masks], np.float32).reshape(-1, 4)
        return sv.Detections(
            xyxy=boxes,
            mask=masks,
            class_id=np.array([s.class_id for s in self.segments], int),
            confidence=np.array([s.score for s in self.segments], np.float32),
            data={"class_name": np.array([s.name for s in self.segments], dtype=object)},
        )


def _xyxy(mask: np.ndarray) -> list[float]:
    x, y, w, h = bbox(mask)
    return [x, y, x + w, y + h]
