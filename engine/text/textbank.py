"""Text-classifier rows for class names: prompts, tokens, the CLIP text session, template
averaging. A row depends only on the synonym and the text model, so rows are cached per synonym,
in memory and on disk (``$KNNCLIP_CACHE`` or ``~/.cache/knnclip``, one file per text model).

The disk cache is a cache: a damaged or foreign file is ignored (with a warning) and rebuilt,
never trusted. It is written atomically.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from knnclip.engine.backends import Session
from knnclip.engine.fsutil import atomic_write_bytes
from knnclip.engine.text.prompts import text_classifier
from knnclip.engine.text.tokenizer import ByteTokenizer, ClipTokenizer

log = logging.getLogger("knnclip.textbank")
_BATCH = 256  # prompts per text-session call


def default_cache_dir() -> Path:
    return Path(os.environ.get("KNNCLIP_CACHE") or Path.home() / ".cache" / "knnclip")


class TextBank:
    """``bank.rows(["wall", "walls"]) -> [2, E]`` normalised classifier rows, computed once each."""

    def __init__(
        self,
        session: Session,
        tokenizer: ClipTokenizer | ByteTokenizer,
        templates: Sequence[str],
        model_sha256: str,
        context_length: int = 77,
        cache_dir: str | os.PathLike[str] | None = "default",
    ) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.templates = list(templates)
        self.context_length = context_length
        self._lock = threading.Lock()
        self._rows: dict[str, np.ndarray] = {}
        if cache_dir == "default":
            cache_dir = default_cache_dir()
        self.cache_path = None if cache_dir is None else Path(cache_dir) / "text" / f"{model_sha256[:32]}.npz"
        self._load_cache()

    def rows(self, synonyms: Sequence[str]) -> np.ndarray:
        """Classifier rows [len(synonyms), E] (L2-normalised template means)."""
        with self._lock:
            missing = [s for s in dict.fromkeys(synonyms) if s not in self._rows]
            if missing:
                self._compute(missing)
                self._save_cache()
            return np.stack([self._rows[s] for s in synonyms])

    def _compute(self, synonyms: list[str]) -> None:
        prompts = [t.format(s) for s in synonyms for t in self.templates]
        tokens = self.tokenizer(prompts, self.context_length)
        features = np.concatenate(
            [
                self.session.infer({"tokens": tokens[i : i + _BATCH]})["text_features"]
                for i in range(0, len(tokens), _BATCH)
            ]
        )
        rows = text_classifier(features.astype(np.float32), len(self.templates))
        for synonym, row in zip(synonyms, rows, strict=True):
            self._rows[synonym] = row
        log.info("computed text embeddings of %d names", len(synonyms))

    def _load_cache(self) -> None:
        if self.cache_path is None or not self.cache_path.is_file():
            return
        try:
            with np.load(self.cache_path, allow_pickle=False) as data:
                names = [str(n) for n in data["names"]]
                rows = np.asarray(data["rows"], np.float32)
            if rows.ndim != 2 or len(rows) != len(names) or not np.isfinite(rows).all():
                raise ValueError("inconsistent arrays")
            norms = np.linalg.norm(rows, axis=1)
            if not np.allclose(norms, 1.0, atol=1e-3):
                raise ValueError("rows are not unit vectors")
        except (OSError, ValueError, KeyError, EOFError) as exc:
            log.warning("ignoring the damaged text-embedding cache %s (%s); it will be rebuilt", self.cache_path, exc)
            return
        self._rows.update(zip(names, rows, strict=True))

    def _save_cache(self) -> None:
        if self.cache_path is None:
            return
        names = list(self._rows)
        buffer = io.BytesIO()
        np.savez(buffer, names=np.asarray(names, dtype=str), rows=np.stack([self._rows[n] for n in names]))
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.cache_path, buffer.getvalue())
        except OSError as exc:  # a read-only home is no reason to fail a segmentation
            log.warning("could not write the text-embedding cache %s: %s", self.cache_path, exc)
