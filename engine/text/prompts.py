"""FC-CLIP's prompt templates and how a class name with synonyms becomes prompts.

A class ``"wall,walls"`` has one text-classifier row per synonym (``wall``, ``walls``); each row
is the mean of the L2-normalised text features of the 14 templates filled with that synonym,
L2-normalised again. Prompts are ordered class-major, then synonym, then template.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from knnclip.engine.errors import InvalidInputError

# ViLD's prompt set, as FC-CLIP uses it at test time (fcclip/fcclip.py VILD_PROMPT).
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)


def class_synonyms(labels: Sequence[str]) -> list[list[str]]:
    """``["wall,walls", "sky"]`` -> ``[["wall", "walls"], ["sky"]]``, checked: no empty vocabulary,
    no empty name, no name used by two classes."""
    if isinstance(labels, str):
        raise InvalidInputError(f"the vocabulary is a list of class names, got the string {labels!r}")
    if len(labels) == 0:
        raise InvalidInputError("the vocabulary is empty: give at least one class name")
    out: list[list[str]] = []
    owner: dict[str, int] = {}
    for i, label in enumerate(labels):
        if not isinstance(label, str):
            raise InvalidInputError(f"class {i}: names are strings, got {type(label).__name__} {label!r}")
        names = list(dict.fromkeys(p.strip() for p in label.split(",") if p.strip()))
        if not names:
            raise InvalidInputError(f"class {i}: empty class name {label!r}")
        for name in names:
            if name in owner and owner[name] != i:
                raise InvalidInputError(
                    f"class name {name!r} is used by class {owner[name]} ({labels[owner[name]]!r}) and "
                    f"class {i} ({label!r}); each name may belong to one class only"
                )
            owner[name] = i
        out.append(names)
    return out


def prompts(synonyms: Sequence[str], templates: Sequence[str] = TEMPLATES) -> list[str]:
    """Every template filled with every synonym, synonym-major."""
    return [t.format(s) for s in synonyms for t in templates]


def text_classifier(per_prompt: np.ndarray, templates: int) -> np.ndarray:
    """[S * templates, E] text features (synonym-major) -> [S, E]: normalise, mean over the
    templates, normalise."""
    x = per_prompt / np.linalg.norm(per_prompt, axis=-1, keepdims=True)
    x = x.reshape(-1, templates, x.shape[-1]).mean(axis=1)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
