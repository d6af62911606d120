"""Class names with synonyms, as FC-CLIP's ``*_with_prompt_eng.txt`` files hold them.

One line per class, ``index:name,synonym,...``; a line named ``invalid_class_id`` (index 0 of
most files: the unlabelled id of the raw annotations) is no class. The remaining lines, in file
order, are the contiguous class indices 0, 1, ... of the prepared annotations.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from knnclip.engine.errors import DatasetError

log = logging.getLogger("knnclip.data")


@dataclass(frozen=True)
class DatasetClass:
    """A class of a dataset: its names (the first is the class's name) and whether it is a thing."""

    names: tuple[str, ...]
    thing: bool = False

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def synonyms(self) -> tuple[str, ...]:
        return self.names[1:]

    @property
    def label(self) -> str:
        """FC-CLIP's comma-separated form."""
        return ",".join(self.names)


def parse_names(text: str) -> tuple[str, ...]:
    """``"wall, walls,wall"`` -> ``("wall", "walls")``: stripped, empty and repeated names dropped."""
    out: list[str] = []
    for name in text.split(","):
        name = name.strip()
        if name and name not in out:
            out.append(name)
    return tuple(out)


def read_class_file(path: str | os.PathLike[str]) -> list[DatasetClass]:
    """Read a ``*_with_prompt_eng.txt`` file (see the module docstring)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read the class-name file ({exc})") from None
    classes = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        index, sep, names = line.partition(":")
        if not sep or not index.strip().isdigit():
            raise DatasetError(f"{path}:{number}: expected 'index:name,synonym,...', got {line!r}")
        if names.strip() == "invalid_class_id":
            continue
        parsed = parse_names(names)
        if not parsed:
            raise DatasetError(f"{path}:{number}: no class name after the index")
        classes.append(DatasetClass(parsed))
    if not classes:
        raise DatasetError(f"{path}: no classes in the file")
    return classes


def unique_names(classes: Sequence[DatasetClass]) -> list[DatasetClass]:
    """Make every name name one class, as a vocabulary requires: a synonym that is another class's
    name, or an earlier class's synonym, is dropped (logged). Two classes with the same name are
    refused: there is no faithful fix."""
    owner: dict[str, int] = {}
    for i, c in enumerate(classes):
        if c.name in owner:
            raise DatasetError(
                f"classes {owner[c.name]} and {i} are both named {c.name!r}; rename one of them in the class file"
            )
        owner[c.name] = i
    out = []
    for i, c in enumerate(classes):
        kept, dropped = [c.name], []
        for s in c.synonyms:
            if owner.setdefault(s, i) == i:
                kept.append(s)
            else:
                dropped.append(s)
        if dropped:
            log.warning("class %d %r: synonyms %s name other classes, dropped", i, c.name, dropped)
        out.append(replace(c, names=tuple(kept)))
    return out
