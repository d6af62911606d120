"""``LocalService``: the engine behind the embedded server.

It opens the segmenter (models and the writable database) in a background thread, so the server
answers ``/healthz`` while large models load and ``/readyz`` once they have; gathers segment
requests into ``segment_batch`` calls (:mod:`knnclip.engine.serve.batcher`); and applies mutations
one at a time. Batches and mutations follow a reader/writer discipline: a mutation waits for the
batches in flight and the next batch for the mutation, so one batch never sees the vocabulary
change between classification and search. A mutation returns only after the database made it
durable (``Database.add``/``add_class``/``remove_class`` sync their log record before returning).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from knnclip.engine.config import RetrievalConfig
from knnclip.engine.errors import DatabaseWriteError, InvalidInputError, KnnclipError
from knnclip.engine.serve import encoding, mutations
from knnclip.engine.serve.batcher import Batcher

if TYPE_CHECKING:  # imported for its type only: the segmenter imports much of the engine
    from knnclip.engine.pipeline.segmenter import Segmenter

log = logging.getLogger("knnclip.serve")

MiB = 1 << 20


@dataclass
class ServeSettings:
    """What ``knnclip serve`` is started with (docs/serving.md lists the defaults' reasons)."""

    models: Path
    db: Path
    backend: str = "auto"
    device: str = "auto"
    search: str = "fp32"  # "bf16": the database's bf16 search (Database.open)
    host: str = "127.0.0.1"
    port: int = 8080
    token_file: Path | None = None
    auth_reads: bool = False
    max_batch: int = 4
    max_wait_ms: float = 10.0
    max_queue: int = 32
    workers: int = 1
    request_timeout_s: float = 60.0
    max_body_bytes: int = 32 * MiB
    max_pixels: int = 40_000_000
    header_timeout_s: float = 10.0  # a request's headers must be complete by then (408)
    body_timeout_s: float = 30.0  # and its body (408)
    max_connections: int = 512  # open connections past this get 503 at once
    snapshot_dir: Path | None = None
    config: RetrievalConfig | None = None
    text_cache: str | None = "default"
    # Ray: replicas keep a copy of the database of their own, shipped from the owner and kept
    # current by its log records (True: no file system shared with the owner), or follow the
    # owner's files (False: one machine, or a shared file system). None: ship when joining an
    # existing cluster (--ray-address), follow the files on the local instance.
    ship_database: bool | None = None

    def __post_init__(self) -> None:
        limits = {
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "workers": self.workers,
            "max_body_bytes": self.max_body_bytes,
            "max_pixels": self.max_pixels,
            "max_connections": self.max_connections,
        }
        for name, seconds in (("header_timeout_s", self.header_timeout_s), ("body_timeout_s", self.body_timeout_s)):
            if not seconds > 0:
                raise InvalidInputError(f"{name} must be > 0, got {seconds}")
        for name, value in limits.items():
            if value < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {value}")
        if self.search not in ("fp32", "bf16"):
            raise InvalidInputError(f"search must be 'fp32' or 'bf16', got {self.search!r}")
        if self.max_wait_ms < 0 or self.request_timeout_s <= 0:
            raise InvalidInputError("max_wait_ms must be >= 0 and request_timeout_s > 0")


@dataclass(frozen=True)
class SegmentRequest:
    """One image and what to return for it."""

    data: bytes
    panoptic: bool = True
    instance: bool = False
    format: str = "json"
    received: float = field(default_factory=time.perf_counter)


class ReadWriteLock:
    """Many readers or one writer, phase-fair: a waiting writer holds off new readers (writers are
    not starved), and when a writer finishes, the readers waiting then go before the next writer
    (readers are not starved by a stream of writers either)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._readers_waiting = 0
        self._readers_turn = False

    def acquire_read(self) -> None:
        with self._cond:
            self._readers_waiting += 1
            self._cond.wait_for(lambda: not self._writer and (not self._writers_waiting or self._readers_turn))
            self._readers_waiting -= 1
            self._readers += 1
            if not self._readers_waiting:
                self._readers_turn = False
                self._cond.notify_all()

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            self._writers_waiting += 1
            self._cond.wait_for(lambda: not self._writer and not self._readers and not self._readers_turn)
            self._writers_waiting -= 1
            self._writer = True

    def release_write(self) -> None:
        with self._cond:
            self._writer = False
            self._readers_turn = self._readers_waiting > 0
            self._cond.notify_all()


def class_list(db: Any) -> list[dict[str, Any]]:
    """``GET /v1/classes``' entries: id, name, synonyms, thing and the number of examples."""
    counts = db.classes
    return [
        {"id": c.id, "name": c.name, "synonyms": list(c.synonyms), "thing": c.thing, "entries": counts.get(c.name, 0)}
        for c in sorted(db.vocabulary.values(), key=lambda c: c.id)
    ]


def snapshot_database(db: Any, snapshot_dir: Path | None) -> dict[str, Any]:
    """``POST /v1/snapshot``: checkpoint ``db`` and, with a ``snapshot_dir``, copy it there as
    ``snapshot-<UTC time>``."""
    db.checkpoint()
    name = None
    if snapshot_dir is not None:
        name = f"snapshot-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S.%fZ')}"
        target = Path(snapshot_dir) / name
        try:
            Path(snapshot_dir).mkdir(parents=True, exist_ok=True)
            db.snapshot(target)
        except DatabaseWriteError:
            raise
        except OSError as exc:  # disk full, read-only, permissions: the database itself is untouched
            shutil.rmtree(target, ignore_errors=True)
            raise DatabaseWriteError(target, "write the snapshot", exc, "the database is unchanged") from None
    return {"checkpointed": True, "snapshot": name, "entries": len(db)}


def segment_requests(segmenter: Segmenter, requests: Sequence[SegmentRequest], max_batch: int) -> list[Any]:
    """Run requests through ``segment_batch``, grouped by what they ask for; each entry is the
    JSON payload or the request's exception."""
    out: list[Any] = [None] * len(requests)
    groups: dict[tuple[bool, bool], list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault((r.panoptic, r.instance), []).append(i)
    for (panoptic, instance), members in groups.items():
        results = segmenter.segment_batch(
            [requests[i].data for i in members], panoptic=panoptic, instance=instance, batch_size=max_batch
        )
        for i, result in zip(members, results, strict=True):
            if isinstance(result, BaseException):
                out[i] = result
                continue
            try:
                out[i] = encoding.result_payload(result, requests[i].format)
            except KnnclipError as exc:
                out[i] = exc
    return out


class LocalService:
    """The segmenter, its batcher and its mutations, in this process."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.segmenter: Segmenter | None = None
        self.load_error: BaseException | None = None
        self._loaded = threading.Event()
        self._rw = ReadWriteLock()
        self._stopping = False
        self.batcher: Batcher[SegmentRequest] = Batcher(
            self._run_batch,
            max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_ms / 1000.0,
            max_queue=settings.max_queue,
            workers=settings.workers,
        )

    # Lifecycle ---------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.segmenter is not None and not self._stopping

    def start(self, on_loaded: Callable[[BaseException | None], None] | None = None) -> None:
        """Start the batcher and open the segmenter in a background thread."""
        self.batcher.start()

        def load() -> None:
            from knnclip.engine.pipeline.segmenter import Segmenter

            s = self.settings
            try:
                start = time.perf_counter()
                self.segmenter = Segmenter.from_dir(
                    s.models,
                    s.db,
                    backend=s.backend,
                    device=s.device,
                    config=s.config,
                    text_cache=s.text_cache,
                    search=s.search,
                )
                if len(self.segmenter.db.vocabulary):
                    self.segmenter.classifier()  # the vocabulary's text embeddings, before the first request
                m = self.segmenter.models
                parts = (("fcclip", m.fcclip), ("text", m.text), ("dinov2", m.dinov2))
                backends = ", ".join(f"{part} on {session.backend}" for part, session in parts)
                log.info(
                    "ready: models (%s) and %s (search: %s) loaded in %.1f s",
                    backends,
                    s.db,
                    self.segmenter.db.stats()["search"],
                    time.perf_counter() - start,
                )
            except BaseException as exc:  # noqa: BLE001 - reported by /readyz and by the server's exit code
                self.load_error = exc
                log.error("could not load the models or the database: %s", exc)
            finally:
                self._loaded.set()
                if on_loaded is not None:
                    on_loaded(self.load_error)

        threading.Thread(target=load, name="knnclip-load", daemon=True).start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout)

    async def stop(self) -> None:
        """Finish the waiting requests, then close the database cleanly (checkpointed)."""
        self._stopping = True
        await self.batcher.stop()
        await asyncio.to_thread(self._loaded.wait)
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        if self.segmenter is None:
            return
        self._rw.acquire_write()  # after any mutation still running
        try:
            if not self.segmenter.db.read_only:
                self.segmenter.db.checkpoint()  # the next start replays no log (docs/serving.md)
            self.segmenter.close()
        finally:
            self.segmenter = None
            self._rw.release_write()

    # Reads -------------------------------------------------------------------------------------
    async def segment(self, request: SegmentRequest) -> dict[str, Any]:
        self._segmenter()  # not ready: refused before it queues
        return await self.batcher.submit(request, self.settings.request_timeout_s)

    def _run_batch(self, requests: list[SegmentRequest]) -> list[Any]:
        self._rw.acquire_read()
        try:
            return segment_requests(self._segmenter(), requests, self.settings.max_batch)
        finally:
            self._rw.release_read()

    async def classes(self) -> list[dict[str, Any]]:
        return class_list(self._segmenter().db)

    def queue_depth(self) -> int:
        return self.batcher.depth

    def entries(self) -> int:
        seg = self.segmenter
        return len(seg.db) if seg is not None else 0

    def stale_replicas(self) -> list[str]:
        return []  # one process: the database is its own

    # Mutations ---------------------------------------------------------------------------------
    async def add_class(self, name: str, synonyms: Sequence[str], thing: bool | None) -> dict[str, Any]:
        return await self._mutate(lambda seg: mutations.add_class(seg, name, synonyms, thing))

    async def add_examples(
        self, image: bytes, masks: np.ndarray, names: list[str], things: dict[str, bool] | None
    ) -> dict[str, Any]:
        return await self._mutate(lambda seg: mutations.add_examples(seg, image, masks, names, things))

    async def add_concept(
        self, name: str, images: list[bytes], thing: bool | None, confidences: dict[str, float | None]
    ) -> dict[str, Any]:
        return await self._mutate(lambda seg: mutations.add_concept(seg, name, images, thing, confidences))

    async def remove_class(self, name: str) -> dict[str, Any]:
        return await self._mutate(lambda seg: mutations.remove_class(seg, name))

    async def entry_page(self, class_name: str | None, source: str | None, page: int, size: int) -> dict[str, Any]:
        return mutations.entry_page(self._segmenter(), class_name, source, page, size)

    async def remove_source(self, source: str) -> dict[str, Any]:
        return await self._mutate(lambda seg: mutations.remove_source(seg, source))

    async def remove_entry(self, entry_id: int) -> dict[str, Any]:
        return await self._mutate(lambda seg: mutations.remove_entry(seg, entry_id))

    async def edit_class(self, name: str, new_name: str | None, merge_into: str | None) -> dict[str, Any]:
        return await self._mutate(lambda seg: mutations.edit_class(seg, name, new_name, merge_into))

    async def snapshot(self) -> dict[str, Any]:
        return await self._mutate(lambda seg: snapshot_database(seg.db, self.settings.snapshot_dir))

    async def _mutate(self, change: Callable[[Any], Any]) -> Any:
        def run() -> Any:
            self._rw.acquire_write()
            try:
                return change(self._segmenter())
            finally:
                self._rw.release_write()

        return await asyncio.to_thread(run)

    def _segmenter(self) -> Any:
        seg = self.segmenter
        if seg is None:
            raise NotReady("the models are still loading" if self.load_error is None else str(self.load_error))
        return seg


class NotReady(Exception):
    """The models are not loaded (yet), or the server is shutting down."""
