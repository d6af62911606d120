"""Where knnclip keeps what it can rebuild: one home for the cache folders every part uses.

``$KNNCLIP_CACHE``, else ``~/.cache/knnclip``, holds the text embeddings (``text/``); the engine
cache (``$KNNCLIP_ENGINE_CACHE``, else its ``engines/``) holds TensorRT's engines and timing
caches, OpenVINO's compiled models and the backend choices measured on this machine.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$KNNCLIP_CACHE``, else ``~/.cache/knnclip``."""
    return Path(os.environ.get("KNNCLIP_CACHE") or Path.home() / ".cache" / "knnclip")


def engine_cache_root() -> Path:
    """``$KNNCLIP_ENGINE_CACHE``, else ``engines`` in :func:`cache_root`."""
    if os.environ.get("KNNCLIP_ENGINE_CACHE"):
        return Path(os.environ["KNNCLIP_ENGINE_CACHE"])
    return cache_root() / "engines"
