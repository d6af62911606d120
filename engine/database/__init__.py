"""The embedding database of kNN-CLIP: FAISS indexes, a write-ahead log, checkpoints, a vocabulary."""

from knnclip.engine.database.database import Database, SearchResult
from knnclip.engine.database.indexes import INDEX_KINDS, METRICS, STORAGES, IndexSpec
from knnclip.engine.database.vocabulary import ClassInfo, Vocabulary

__all__ = ["INDEX_KINDS", "METRICS", "STORAGES", "ClassInfo", "Database", "IndexSpec", "SearchResult", "Vocabulary"]
