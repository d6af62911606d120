"""Text-classifier rows for class names: prompts, tokens, the CLIP text session, template
averaging. A row depends only on the synonym and the text model, so rows are cached per synonym,
in memory and on disk (``$KNNCLIP_CACHE`` or ``~/.cache/knnclip``, one file per text model).

The disk cache is a cache: a damaged or foreign file is ignored (with a warning) and rebuilt,
never trusted. It is written atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from knnclip.engine.artifact import TEXT_BATCH
from knnclip.engine.backends import Session
from knnclip.engine.cache import cache_root
from knnclip.engine.fsutil import atomic_write_bytes, clear_for_file, read_regular_file, unsafe_folder
from knnclip.engine.text.prompts import text_classifier
from knnclip.engine.text.tokenizer import ByteTokenizer, ClipTokenizer

log = logging.getLogger("knnclip.textbank")
_BATCH = TEXT_BATCH  # prompts per text-session call
_CACHE_LIMIT = 1 << 30  # bytes; a larger cache file is not read


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
        self._rebuild_cache = False
        if cache_dir == "default":
            cache_dir = cache_root()
        # A row depends on the weights, the templates, the context length and the tokenizer: the key holds them all.
        key = [model_sha256, self.templates, context_length, type(tokenizer).__name__]
        self.cache_key = hashlib.sha256(json.dumps(key).encode()).hexdigest()
        self.cache_path = None if cache_dir is None else Path(cache_dir) / "text" / f"{self.cache_key[:32]}.npz"
        if self.cache_path is not None:
            unsafe = unsafe_folder(self.cache_path.parent.parent) or unsafe_folder(self.cache_path.parent)
            if unsafe is not None:  # anyone who can write there could plant rows we would trust
                log.warning("not using the text-embedding cache: %s; chmod go-w it or set KNNCLIP_CACHE", unsafe)
                self.cache_path = None
        self._load_cache()

    def rows(self, synonyms: Sequence[str]) -> np.ndarray:
        """Classifier rows [len(synonyms), E] (L2-normalised template means)."""
        with self._lock:
            missing = [s for s in dict.fromkeys(synonyms) if s not in self._rows]
            if missing or self._rebuild_cache:
                if missing:
                    self._compute(missing)
                self._save_cache()
                self._rebuild_cache = False
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
        """Rows from the disk cache. A cache is disposable: anything wrong with the file (damaged,
        truncated, foreign, another width, not a file at all) is ignored with a warning and the
        file is rebuilt from the text model on the next save."""
        if self.cache_path is None:
            return
        raw = read_regular_file(self.cache_path, _CACHE_LIMIT)
        if raw is None:
            if self.cache_path.exists() or self.cache_path.is_symlink():
                self._damaged("not a regular file of at most 1 GiB")
            return
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as data:
                names_array, rows_array = data["names"], data["rows"]
                key = str(data["key"]) if "key" in data.files else None
            if key != self.cache_key:
                raise ValueError("written for another text model, template set or tokenizer")
            if names_array.dtype.kind != "U" or names_array.ndim != 1:
                raise ValueError(f"names are {names_array.dtype} [{names_array.ndim}-d], not strings")
            if rows_array.dtype != np.float32 or rows_array.ndim != 2 or len(rows_array) != len(names_array):
                raise ValueError(f"rows are {rows_array.dtype} {rows_array.shape} for {len(names_array)} names")
            width = self._width()
            if width is not None and rows_array.shape[1] != width:
                raise ValueError(f"rows are {rows_array.shape[1]}-d, the text model gives {width}-d")
            names, rows = [str(n) for n in names_array], np.asarray(rows_array)
            if len(set(names)) != len(names) or not np.isfinite(rows).all():
                raise ValueError("repeated names or non-finite rows")
            if not np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-3):
                raise ValueError("rows are not unit vectors")
        except Exception as exc:  # noqa: BLE001 - zip, npy and allocation errors alike: the cache is rebuilt
            self._damaged(f"{type(exc).__name__}: {exc}")
            return
        self._rows.update(zip(names, rows, strict=True))

    def _damaged(self, why: str) -> None:
        log.warning("ignoring the damaged text-embedding cache %s (%s); it will be rebuilt", self.cache_path, why)
        self._rebuild_cache = True

    def _width(self) -> int | None:
        for spec in self.session.outputs:
            if spec.name == "text_features" and isinstance(spec.shape[-1], int):
                return int(spec.shape[-1])
        return None

    def _save_cache(self) -> None:
        if self.cache_path is None:
            return
        # NumPy's unicode arrays drop trailing NULs, so such a name would come back as another one.
        names = [n for n in self._rows if not n.endswith("\x00")]
        buffer = io.BytesIO()
        rows = np.stack([self._rows[n] for n in names])
        np.savez(buffer, names=np.asarray(names, dtype=str), rows=rows, key=np.asarray(self.cache_key))
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            if clear_for_file(self.cache_path):
                log.warning("removed what stood at the text-embedding cache's place, %s", self.cache_path)
            atomic_write_bytes(self.cache_path, buffer.getvalue())
        except OSError as exc:  # a read-only home is no reason to fail a segmentation
            log.warning("could not write the text-embedding cache %s: %s", self.cache_path, exc)
