"""knnclip run time: the compiled ops, the database, the pipeline, backends, evaluation,
benchmarks and the CLI (``docs/architecture.md`` maps the folders).

Importing this package loads only the version; ``Database``, ``Segmenter`` and
``RetrievalConfig`` are imported on first access (FAISS with the first, the models' runtimes
with the second), so ``import knnclip.engine`` stays cheap.
"""

import os
from typing import Any

# The engine runs ONNX Runtime, FAISS, BLAS and its own OpenMP kernels one after another; OpenMP
# workers that spin after a parallel region starve the next library's threads (measured: mask
# pooling 29 ms -> 0.5 ms, search 14 ms -> 0.8 ms on 2 cores). Passive waiting unless the user
# chose a policy. It only takes effect if no OpenMP runtime was loaded before knnclip (torch loads one).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from knnclip.engine.version import __version__

__all__ = ["Database", "RetrievalConfig", "Segmenter", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Database":
        from knnclip.engine.database import Database

        return Database
    if name == "Segmenter":
        from knnclip.engine.pipeline.segmenter import Segmenter

        return Segmenter
    if name == "RetrievalConfig":
        from knnclip.engine.config import RetrievalConfig

        return RetrievalConfig
    raise AttributeError(f"module 'knnclip.engine' has no attribute {name!r}")
