"""knnclip run time: compiled ops, database, sessions, pipeline and CLI.

Imports NumPy and the compiled module eagerly; FAISS, ONNX Runtime, torch and TensorRT only
where they are used (``Database`` imports FAISS on first access).
"""

from typing import Any

from knnclip.engine._version import __version__

__all__ = ["Database", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Database":
        from knnclip.engine.database import Database

        return Database
    raise AttributeError(f"module 'knnclip.engine' has no attribute {name!r}")
