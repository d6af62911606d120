"""The embedding database of kNN-CLIP: FAISS indexes, a write-ahead log, checkpoints, a vocabulary.

The names are imported on first use (faiss comes with the cpu or gpu extra; a command line that
only lists choices must not need it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from knnclip.engine.database.database import Database, DatabaseState, SearchResult
    from knnclip.engine.database.indexes import IndexSpec
    from knnclip.engine.database.kinds import INDEX_KINDS, METRICS, STORAGES
    from knnclip.engine.database.vocabulary import ClassInfo, Vocabulary

_HOMES = {
    "Database": "database",
    "DatabaseState": "database",
    "SearchResult": "database",
    "IndexSpec": "indexes",
    "INDEX_KINDS": "kinds",
    "METRICS": "kinds",
    "STORAGES": "kinds",
    "ClassInfo": "vocabulary",
    "Vocabulary": "vocabulary",
}
__all__ = [
    "INDEX_KINDS",
    "METRICS",
    "STORAGES",
    "ClassInfo",
    "Database",
    "DatabaseState",
    "IndexSpec",
    "SearchResult",
    "Vocabulary",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'knnclip.engine.database' has no attribute {name!r}")
    return getattr(importlib.import_module(f"knnclip.engine.database.{home}"), name)
