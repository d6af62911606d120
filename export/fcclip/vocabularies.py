"""Training vocabularies of FC-CLIP checkpoints: the classes a checkpoint saw in training get the
geometric ensemble's alpha, the others beta. Official FC-CLIP checkpoints are trained on COCO
panoptic, whose 133 categories (with the synonyms FC-CLIP's prompt-engineered class list gives
them) ship in ``coco_panoptic_classes.json``."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

COCO_PANOPTIC = "coco-panoptic"


@functools.cache
def coco_panoptic_classes() -> tuple[dict[str, Any], ...]:
    """COCO panoptic's categories: ``{"id", "names" (name first, then synonyms), "thing"}``.

    >>> classes = coco_panoptic_classes()
    >>> len(classes), sum(c["thing"] for c in classes), classes[0]["names"][0]
    (133, 80, 'person')
    """
    text = resources.files(__package__).joinpath("coco_panoptic_classes.json").read_text()
    return tuple(json.loads(text)["classes"])


def coco_panoptic_seen_names() -> list[str]:
    """Every name and synonym of COCO panoptic's categories: what ``seen_names`` defaults to."""
    return sorted({name for c in coco_panoptic_classes() for name in c["names"]})
