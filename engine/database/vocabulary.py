"""The database's classes: stable integer ids, a name and its synonyms.

A label such as ``"wall,walls,brick wall"`` (FC-CLIP's class-name format) names the class ``wall``
with synonyms ``walls`` and ``brick wall``; any of the three finds it. Ids are handed out in
order and never reused, even after a class is removed, so an id in an old result always means
the class it meant then.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from knnclip.engine.errors import InvalidInputError, UnknownClassError

MAX_NAME_CHARS = 256  # one class name or synonym
MAX_NAMES_PER_CLASS = 64  # a name and its synonyms


@dataclass(frozen=True)
class ClassInfo:
    """One class of the vocabulary. ``thing`` marks countable objects (panoptic segmentation
    gives each instance its own segment) as opposed to stuff (one segment per class)."""

    id: int
    name: str
    synonyms: tuple[str, ...] = ()
    thing: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        """The name followed by its synonyms."""
        return (self.name, *self.synonyms)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "name": self.name, "synonyms": list(self.synonyms)}
        if self.thing:  # written only when set, so databases from before the flag read the same
            out["thing"] = True
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ClassInfo:
        synonyms = tuple(str(s) for s in obj.get("synonyms", ()))
        return cls(int(obj["id"]), str(obj["name"]), synonyms, bool(obj.get("thing", False)))


def split_label(label: str, synonyms: tuple[str, ...] | list[str] = ()) -> tuple[str, tuple[str, ...]]:
    """``"wall,walls"`` -> ``("wall", ("walls",))``, merged with extra ``synonyms``, duplicates dropped."""
    if not isinstance(label, str):
        raise InvalidInputError(f"class names are strings, got {type(label).__name__} {label!r}")
    parts = [p.strip() for p in label.split(",")] + [str(s).strip() for s in synonyms]
    # Bounded: every name is embedded by the text encoder and stored in the log, the vocabulary
    # and the text cache; a megabyte "synonym" would hold the writer for seconds and bloat them all.
    if len(parts) > MAX_NAMES_PER_CLASS:
        raise InvalidInputError(f"a class has at most {MAX_NAMES_PER_CLASS} names and synonyms, got {len(parts)}")
    long = next((p for p in parts if len(p) > MAX_NAME_CHARS), None)
    if long is not None:
        raise InvalidInputError(f"class names and synonyms have at most {MAX_NAME_CHARS} characters: {long[:40]!r}...")
    if any(unicodedata.category(ch) == "Cc" for part in parts for ch in part):
        raise InvalidInputError(f"class names may not hold control characters: {label!r}")
    if not parts[0]:
        raise InvalidInputError(f"empty class name in label {label!r}")
    names = list(dict.fromkeys(p for p in parts if p))
    return names[0], tuple(names[1:])


class Vocabulary(Mapping[int, ClassInfo]):
    """Class id -> ClassInfo, with lookup by name or synonym (``vocab.find("walls")``)."""

    def __init__(self, classes: list[ClassInfo] | None = None, next_id: int = 0) -> None:
        self._by_id: dict[int, ClassInfo] = {}
        self._by_name: dict[str, int] = {}
        self.next_id = next_id
        for info in classes or []:
            self.put(info)

    # Mapping interface -------------------------------------------------------------------------
    def __getitem__(self, class_id: int) -> ClassInfo:
        try:
            return self._by_id[int(class_id)]
        except KeyError:
            raise UnknownClassError(f"no class with id {class_id} in the vocabulary") from None

    def __iter__(self) -> Iterator[int]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def __repr__(self) -> str:
        return f"Vocabulary({[c.name for c in self._by_id.values()]})"

    # Lookup ------------------------------------------------------------------------------------
    def find(self, name: str) -> ClassInfo | None:
        """The class that ``name`` (a name or synonym; the first of a comma list) belongs to."""
        key, _ = split_label(name)
        class_id = self._by_name.get(key)
        return None if class_id is None else self._by_id[class_id]

    def get_by_name(self, name: str) -> ClassInfo:
        info = self.find(name)
        if info is None:
            known = ", ".join(sorted(c.name for c in self._by_id.values())) or "none"
            raise UnknownClassError(f"no class named {name!r} in the vocabulary (classes: {known})")
        return info

    # Changes (the database logs them before it calls these) ------------------------------------
    def plan(self, label: str, synonyms: tuple[str, ...] | list[str] = (), thing: bool | None = None) -> ClassInfo:
        """The ClassInfo that registering ``label`` would produce, without changing anything.

        An existing class keeps its id and gains the new synonyms (and takes ``thing`` when it is
        given); a new one gets ``next_id``. A synonym that already names another class is an error.
        """
        name, syns = split_label(label, synonyms)
        existing = self.find(name)
        for s in syns:
            owner = self._by_name.get(s)
            if owner is not None and (existing is None or owner != existing.id):
                raise InvalidInputError(
                    f"synonym {s!r} of {name!r} already names class {self._by_id[owner].name!r} (id {owner})"
                )
        if existing is None:
            return ClassInfo(self.next_id, name, syns, bool(thing))
        merged = tuple(dict.fromkeys((*existing.synonyms, *(s for s in syns if s != existing.name))))
        return ClassInfo(existing.id, existing.name, merged, existing.thing if thing is None else bool(thing))

    def put(self, info: ClassInfo) -> None:
        """Insert or replace a class."""
        old = self._by_id.get(info.id)
        if old is not None:
            for n in old.names:
                self._by_name.pop(n, None)
        self._by_id[info.id] = info
        for n in info.names:
            self._by_name[n] = info.id
        self.next_id = max(self.next_id, info.id + 1)

    def remove(self, class_id: int) -> ClassInfo:
        info = self[class_id]
        for n in info.names:
            self._by_name.pop(n, None)
        del self._by_id[info.id]
        return info

    def copy(self) -> Vocabulary:
        return Vocabulary(list(self._by_id.values()), self.next_id)

    def to_json(self) -> dict[str, Any]:
        return {"next_id": self.next_id, "classes": [c.to_json() for c in self._by_id.values()]}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Vocabulary:
        return cls([ClassInfo.from_json(c) for c in obj["classes"]], int(obj["next_id"]))
