"""A cache of built TensorRT engines, keyed by everything that makes an engine valid.

An engine is only good for the TensorRT version that built it, the GPU model (compute
capability), the exact ONNX graph and the build settings (precision, optimisation profiles).
:class:`EngineKey` holds those; its digest names the cache entry, and the entry's sidecar
manifest repeats them with the plan's SHA-256, so a stale, foreign or damaged entry is never
deserialised: it is reported (:meth:`EngineCache.get`) and rebuilt (:meth:`EngineCache.get_or_build`).

Concurrent builders of one key do not corrupt each other: a per-key lock file serialises them
(the second finds the first's engine when it gets the lock), and every file is written to a
temporary name and renamed into place. Pure Python: the cache logic is tested without TensorRT.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from knnclip.engine.cache import engine_cache_root
from knnclip.engine.fsutil import atomic_write_bytes, clear_for_file, read_regular_file, waiting_lock

log = logging.getLogger("knnclip.engine_cache")
_FORMAT = "knnclip-engine-cache/2"  # 2: keyed by every file of the artefact


@dataclass(frozen=True)
class EngineKey:
    """What an engine was built from and for."""

    artifact_sha256: str  # artifact.artifact_digest: every file of the artefact
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"
    precision: str  # "fp32", "fp32+tf32", "fp16", "bf16"
    profiles: tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...] = ()  # name, min, opt, max

    def digest(self) -> str:
        body = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(body.encode()).hexdigest()[:32]

    def mismatch(self, other: dict[str, Any]) -> list[str]:
        """The fields in which a stored key differs from this one, as readable lines."""
        mine = json.loads(json.dumps(asdict(self)))  # tuples as lists, like the stored JSON
        return [f"{k}: built for {other.get(k)!r}, here {v!r}" for k, v in mine.items() if other.get(k) != v]


_MANIFEST_LIMIT = 1 << 20  # bytes
_PLAN_LIMIT = 1 << 36  # 64 GiB: no plausible engine is larger


class StaleEngineError(Exception):
    """A cached engine does not match this machine or graph (the message says how)."""


class EngineCache:
    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else engine_cache_root()

    def _paths(self, key: EngineKey) -> tuple[Path, Path, Path]:
        stem = self.root / key.digest()
        return stem.with_suffix(".plan"), stem.with_suffix(".json"), stem.with_suffix(".lock")

    def get(self, key: EngineKey) -> bytes | None:
        """The cached plan for ``key``, or None when there is none or it is stale or damaged
        (logged with the reason; such an entry is rebuilt by :meth:`get_or_build`)."""
        try:
            return self._read(key)
        except StaleEngineError as exc:
            log.warning("%s", exc)
            return None

    def _read(self, key: EngineKey) -> bytes | None:
        plan_path, meta_path, _ = self._paths(key)
        if not (meta_path.exists() or meta_path.is_symlink()) and not plan_path.exists():
            return None
        raw = read_regular_file(meta_path, _MANIFEST_LIMIT)
        if raw is None:
            raise StaleEngineError(f"{meta_path}: missing, not a regular file, or absurdly large")
        try:
            meta = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise StaleEngineError(f"{meta_path}: unreadable engine manifest ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT or not isinstance(meta.get("key"), dict):
            raise StaleEngineError(f"{meta_path}: not a knnclip engine manifest")
        size = meta.get("plan_bytes")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= _PLAN_LIMIT:
            raise StaleEngineError(f"{meta_path}: the engine manifest gives no plausible plan size ({size!r})")
        differences = key.mismatch(meta["key"])
        if differences:
            raise StaleEngineError(f"{plan_path}: stale engine ({'; '.join(differences)})")
        plan = read_regular_file(plan_path, size)
        if plan is None or len(plan) != size or hashlib.sha256(plan).hexdigest() != meta.get("plan_sha256"):
            raise StaleEngineError(f"{plan_path}: the engine file is missing, truncated or damaged")
        return plan

    def put(self, key: EngineKey, plan: bytes, extra: dict[str, Any] | None = None) -> Path:
        """Store ``plan`` for ``key``: the plan first, then the manifest that validates it."""
        plan_path, meta_path, _ = self._paths(key)
        self.root.mkdir(parents=True, exist_ok=True)
        for path in (plan_path, meta_path):
            if clear_for_file(path):
                log.warning("removed what stood in the place of the cache entry %s", path)
        atomic_write_bytes(plan_path, plan)
        meta = {
            "format": _FORMAT,
            "key": json.loads(json.dumps(asdict(key))),
            "plan_sha256": hashlib.sha256(plan).hexdigest(),
            "plan_bytes": len(plan),
            **(extra or {}),
        }
        atomic_write_bytes(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
        return plan_path

    @contextlib.contextmanager
    def _locked(self, key: EngineKey) -> Iterator[None]:
        _, _, lock_path = self._paths(key)
        self.root.mkdir(parents=True, exist_ok=True)
        with waiting_lock(lock_path):  # released by the kernel if the builder dies
            yield

    def get_or_build(self, key: EngineKey, build: Callable[[], bytes], extra: dict[str, Any] | None = None) -> bytes:
        """The cached plan, or ``build()``'s, stored; one builder per key at a time."""
        plan = self.get(key)
        if plan is not None:
            return plan
        with self._locked(key):
            plan = self.get(key)  # another process may have built it while we waited
            if plan is not None:
                return plan
            log.info("building a TensorRT engine for %s", key)
            plan = build()
            if not plan:
                raise StaleEngineError("the TensorRT build returned no engine")
            self.put(key, plan, extra)
            return plan
