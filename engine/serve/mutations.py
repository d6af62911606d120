"""The service's changes to the vocabulary, each a function of the segmenter that returns its
JSON reply (docs/serving.md): the embedded service runs them under its write lock, and Ray
Serve's database owner under its own, so both answer alike. The listing of entries is here too,
for the same reason."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from knnclip.engine.errors import InvalidInputError

if TYPE_CHECKING:  # imported for its type only: the segmenter imports much of the engine
    from knnclip.engine.database.vocabulary import ClassInfo
    from knnclip.engine.pipeline.segmenter import Segmenter


def class_json(info: ClassInfo) -> dict[str, Any]:
    return {"id": info.id, "name": info.name, "synonyms": list(info.synonyms), "thing": info.thing}


def add_class(seg: Segmenter, name: str, synonyms: Sequence[str], thing: bool | None) -> dict[str, Any]:
    return class_json(seg.add_class(name, synonyms, thing=thing))


def add_examples(
    seg: Segmenter, image: bytes, masks: np.ndarray, names: list[str], things: dict[str, bool] | None
) -> dict[str, Any]:
    ids = seg.add_examples([image], [masks], [names], things=things)
    return {
        "added": len(ids),
        "skipped": len(names) - len(ids),
        "classes": sorted(set(names)),
        "ids": [int(i) for i in ids],
        "entries": len(seg.db),
    }


def add_concept(
    seg: Segmenter, name: str, images: list[bytes], thing: bool | None, confidences: dict[str, float | None]
) -> dict[str, Any]:
    """A concept from unlabelled images: every proposed mask confident enough of both is added."""
    added = seg.add_concept(name, images, thing=thing, **confidences)
    return {
        "name": name,
        "added": len(added),
        "images_used": len({a.image for a in added}),
        "masks": [vars(a) for a in added],
        "entries": len(seg.db),
    }


def remove_class(seg: Segmenter, name: str) -> dict[str, Any]:
    removed = seg.remove_class(name)
    return {"removed": name, "entries_removed": removed, "entries": len(seg.db)}


MAX_PAGE_SIZE = 1000


def entry_page(seg: Segmenter, class_name: str | None, source: str | None, page: int, page_size: int) -> dict[str, Any]:
    """One page of the entries (``GET /v1/entries``), with where each came from."""
    if page < 0 or not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidInputError(f"page is >= 0 and page_size 1..{MAX_PAGE_SIZE}, got {page} and {page_size}")
    records = seg.entries(class_name, source, offset=page * page_size, limit=page_size + 1)
    rows = [
        {"id": r.id, "class": r.class_name, "source": r.source, "mask": r.mask, "time": r.time}
        for r in records[:page_size]
    ]
    return {"entries": rows, "page": page, "page_size": page_size, "more": len(records) > page_size}


def remove_source(seg: Segmenter, source: str) -> dict[str, Any]:
    return {"source": source, "removed": seg.remove_source(source), "entries": len(seg.db)}


def remove_entry(seg: Segmenter, entry_id: int) -> dict[str, Any]:
    seg.remove_entries([entry_id])
    return {"removed": entry_id, "entries": len(seg.db)}


def edit_class(seg: Segmenter, name: str, new_name: str | None, merge_into: str | None) -> dict[str, Any]:
    """Rename class ``name`` (``new_name``) or merge it into another (``merge_into``): one of the two."""
    if (new_name is None) == (merge_into is None):
        raise InvalidInputError("give either 'name' (a rename) or 'merge_into' (a merge), not both or neither")
    if new_name is not None:
        return {"renamed": name, "class": class_json(seg.rename_class(name, new_name)), "entries": len(seg.db)}
    assert merge_into is not None
    moved = seg.db.classes.get(seg.db.vocabulary.get_by_name(name).name, 0)
    info = seg.merge_classes(name, merge_into)
    return {"merged": name, "class": class_json(info), "entries_moved": moved, "entries": len(seg.db)}
