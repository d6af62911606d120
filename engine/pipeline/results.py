"""What a segmentation returns: the semantic map, the panoptic segments and, per segment, the
retrieval evidence behind its class."""

from __future__ import annotations

import dataclasses
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

    def to_json(self) -> dict[str, Any]:
        evidence = dataclasses.asdict(self.evidence)
        evidence["retrieval_confidence"] = round(evidence["retrieval_confidence"], 6)
        evidence["neighbours"] = [[name, round(sim, 6)] for name, sim in self.evidence.neighbours]
        return {
            "id": self.id,
            "class_id": self.class_id,
            "name": self.name,
            "score": round(self.score, 6),
            "area": self.area,
            "is_thing": self.is_thing,
            "evidence": evidence,
        }


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

    def to_json(self) -> dict[str, Any]:
        area = int(self.mask.sum())
        return {"class_id": self.class_id, "name": self.name, "score": round(self.score, 6), "area": area,
                "bbox": bbox(self.mask)}  # fmt: skip


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
        present = np.unique(self.semantic).tolist()
        return {
            "image": self.name,
            "size": list(self.semantic.shape),
            "semantic_classes": {str(c): self.classes[c] for c in present if c in self.classes},
            "segments": [s.to_json() for s in self.segments],
            "instances": [i.to_json() for i in self.instances],
            "timings_ms": {k: round(v, 3) for k, v in self.timings.items()},
        }
