"""What a segmentation returns: the semantic map, the panoptic segments and, per segment, the
retrieval evidence behind its class."""

from __future__ import annotations

from dataclasses import dataclass, field
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

    def to_json(self) -> dict[str, Any]:
        """The result record of :mod:`knnclip.engine.formats`, what ``knnclip segment`` writes."""
        from knnclip.engine.formats import result_record  # formats renders results: it imports this module

        return result_record(self)
