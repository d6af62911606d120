"""knnclip run time: compiled ops, database, sessions, pipeline and CLI.

Imports NumPy and the compiled module eagerly; FAISS, ONNX Runtime, torch and TensorRT only
where they are used (``Database`` imports FAISS on first access).
"""

import os
from typing import Any

# The engine runs ONNX Runtime, FAISS, BLAS and its own OpenMP kernels one after another; OpenMP
# workers that spin after a parallel region starve the next library's threads (measured: mask
# pooling 29 ms -> 0.5 ms, search 14 ms -> 0.8 ms on 2 cores). Passive waiting unless the user
# chose a policy. It only takes effect if no OpenMP runtime was loaded before knnclip (torch loads one).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from knnclip.engine.version import __version__  # noqa: E402

__all__ = ["Database", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Database":
        from knnclip.engine.database import Database

        return Database
    raise AttributeError(f"module 'knnclip.engine' has no attribute {name!r}")
