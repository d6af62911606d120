"""The text classifier of one vocabulary version, built from the database's classes and cached
until the vocabulary changes."""

from __future__ import annotations

import threading
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

import numpy as np

from knnclip.engine.database.vocabulary import ClassInfo
from knnclip.engine.errors import InvalidInputError
from knnclip.engine.pipeline.models import FCCLIPHead
from knnclip.engine.text.textbank import TextBank


@dataclass(frozen=True)
class Classifier:
    """Rows per synonym (class-major) plus void, and what maps results back to class ids."""

    classes: list[ClassInfo]
    rows: np.ndarray  # [S + 1, E], void last
    synonyms_per_class: list[int]
    seen: np.ndarray  # [C] bool: FC-CLIP saw the class in training (alpha, else beta)
    lut: np.ndarray  # database class id + 1 -> class index (0 -> -1 for "no neighbour")
    is_thing: list[bool]
    # What identifies this vocabulary's arrays (their device copies are cached under it): the
    # classes' ids, names and kinds, and the text rows' weights.
    key: Hashable = field(default=None, compare=False)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def ids(self) -> np.ndarray:
        """[C] int32 database class id of each class index."""
        return np.array([c.id for c in self.classes], np.int32)


def vocabulary_key(classes: list[ClassInfo]) -> tuple[tuple[int, tuple[str, ...], bool | None], ...]:
    return tuple((c.id, tuple(c.names), c.thing) for c in classes)


def build_classifier(classes: list[ClassInfo], text: TextBank, head: FCCLIPHead) -> Classifier:
    """The classifier of ``classes`` (sorted by id) from their text rows and FC-CLIP's void embedding."""
    if not classes:
        raise InvalidInputError(
            "the vocabulary is empty: add classes first (add_class, add_examples, or knnclip db add)"
        )
    rows = text.rows([name for c in classes for name in c.names])
    matrix = np.concatenate([rows, head.void_embedding[None]]).astype(np.float32)
    lut = np.full(classes[-1].id + 2, -1, np.int64)
    for index, c in enumerate(classes):
        lut[c.id + 1] = index
    seen = np.array([any(n in head.seen_names for n in c.names) for c in classes])
    per_class = [len(c.names) for c in classes]
    key = (text.cache_key, vocabulary_key(classes))
    return Classifier(classes, matrix, per_class, seen, lut, [c.thing for c in classes], key)


class ClassifierCache:
    """The classifier of the latest vocabulary, rebuilt only when the vocabulary changed."""

    def __init__(self, text: TextBank, head: FCCLIPHead) -> None:
        self._text, self._head = text, head
        self._lock = threading.Lock()
        self._key: Hashable = None
        self._classifier: Classifier | None = None

    def get(self, vocabulary: Mapping[int, ClassInfo]) -> Classifier:
        classes = sorted(vocabulary.values(), key=lambda c: c.id)
        key = vocabulary_key(classes)
        with self._lock:
            if self._classifier is None or key != self._key:
                self._classifier = build_classifier(classes, self._text, self._head)
                self._key = key
            return self._classifier
