"""The kNN-CLIP settings of the segmenter, in one place.

The paper does not publish its exact constants. ``knnclip eval sweep`` chooses them from data (a
grid over k, tau, T and lambda on a held-out part of a training split) and writes the winner
with the data it ran on (``--write-config``; load it with ``RetrievalConfig.from_file`` or the
CLI's ``--config``). The defaults below are reasoned from the method (each field says why), not
tuned on a real dataset: a sweep on synthetic data says nothing about real images.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knnclip.engine.errors import InvalidInputError
from knnclip.engine.fsutil import atomic_write_bytes

CONFIG_FORMAT = "knnclip-retrieval-config/1"
FUSIONS = ("out_of_vocab", "final")  # where retrieval is mixed in (pipeline/postprocess.py: fuse_retrieval)
MIN_TAU = 1e-6  # similarities are cosines in [-1, 1]: a colder softmax is an argmax already
MAX_TAU = 1e3


@dataclass(frozen=True)
class RetrievalConfig:
    """How database neighbours turn into class probabilities and how those are fused.

    k
        Neighbours per query mask. 10: enough votes that one mislabelled entry cannot decide a
        class, few enough that a class with a handful of examples is not outvoted by the
        distance-weighted tail of a large one.
    tau
        Softmax temperature over the neighbours' cosine similarities. 0.05: similarities of
        DINOv2 key embeddings of the same class sit within about 0.1-0.2 of each other, so a
        temperature near that gap lets the closest neighbours dominate without ignoring the rest.
    T
        Fusion happens only where the retrieval distribution's maximum reaches T. 0.5: at least
        half of the (weighted) neighbours agree on one class.
    lam
        Weight of the retrieval distribution where it is fused. 0.5: retrieval and FC-CLIP count
        equally, so a confident retrieval overturns a base prediction unless FC-CLIP is far surer.
    mask_threshold
        Query masks are binarised at logit > this before pooling DINOv2 keys (kNN-CLIP: 0).
    fusion
        Where retrieval is mixed in. ``"out_of_vocab"`` (default; the paper's Fig. 4): into
        FC-CLIP's out-of-vocabulary (CLIP) class distribution, ``p_out' = lam * P_ret + (1 - lam)
        * p_out``, before the geometric ensemble ``p_in^(1-w) p_out'^w`` (w = alpha for classes
        seen in training, beta for the others): the in-vocabulary branch can still damp a
        retrieval it disagrees with, and T and lambda mean what the paper means by them.
        ``"final"``: into the ensembled distribution, ``lam * P_ret + (1 - lam) * P_base``
        (the engine's placement before; retrieval then has the last word).
    concept_mask_confidence, concept_class_confidence
        Concept customisation (``add_concept``) adds every proposal whose mean mask probability
        reaches the first and whose probability of being the concept reaches the second. 0.7:
        a mask FC-CLIP is fairly sure of (its instance inference's mask score); 0.5: the concept
        is the most likely class of that mask against the whole vocabulary.
    """

    k: int = 10
    tau: float = 0.05
    T: float = 0.5
    lam: float = 0.5
    mask_threshold: float = 0.0
    fusion: str = "out_of_vocab"
    concept_mask_confidence: float = 0.7
    concept_class_confidence: float = 0.5

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.k, int) and not isinstance(self.k, bool) and 1 <= self.k <= 2048):
            problems.append(f"k must be an integer in [1, 2048], got {self.k!r}")
        numbers = {
            name: getattr(self, name)
            for name in ("tau", "T", "lam", "mask_threshold", "concept_mask_confidence", "concept_class_confidence")
        }
        for name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                problems.append(f"{name} must be a finite number, got {value!r}")
        if not problems:
            # float32 is what the kernels compute in: a tau below its smallest normal number is 0 there
            if not MIN_TAU <= self.tau <= MAX_TAU:
                problems.append(f"tau must be in [{MIN_TAU}, {MAX_TAU}], got {self.tau!r}")
            if not 0.0 <= self.T <= 1.0:
                problems.append(f"T must be in [0, 1], got {self.T!r}")
            if not 0.0 <= self.lam <= 1.0:
                problems.append(f"lam must be in [0, 1], got {self.lam!r}")
            for name in ("concept_mask_confidence", "concept_class_confidence"):
                if not 0.0 <= getattr(self, name) <= 1.0:
                    problems.append(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.fusion not in FUSIONS:
            problems.append(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if problems:
            raise InvalidInputError("invalid retrieval config: " + "; ".join(problems))

    def replace(self, **changes: Any) -> RetrievalConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_file(self, path: str | os.PathLike[str], source: dict[str, Any] | None = None) -> None:
        """Write the settings as JSON with ``source`` (what chose them: a sweep's data and score)."""
        body = {"format": CONFIG_FORMAT, "retrieval": self.to_json(), "source": source or {}}
        atomic_write_bytes(path, json.dumps(body, indent=1).encode())

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> RetrievalConfig:
        """Read settings written by ``to_file`` (``knnclip eval sweep --write-config``)."""
        try:
            body = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"{path}: not a readable retrieval config ({exc})") from None
        valid = isinstance(body, dict) and body.get("format") == CONFIG_FORMAT
        if not valid or not isinstance(body.get("retrieval"), dict):
            raise InvalidInputError(f"{path}: not a knnclip retrieval config (format {CONFIG_FORMAT!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(body["retrieval"]) - fields
        if unknown:
            raise InvalidInputError(f"{path}: unknown retrieval settings {sorted(unknown)}")
        try:
            return cls(**body["retrieval"])
        except InvalidInputError as exc:
            raise InvalidInputError(f"{path}: {exc}") from None
