"""knnclip.engine.Database: (embedding, class) pairs in FAISS, grown one class at a time, durably.

The API lives here; the in-memory state and how log records change it in
:mod:`~knnclip.engine.database.contents`, the directory layout, checkpoints and replay in
:mod:`~knnclip.engine.database.storage`, the log itself in :mod:`~knnclip.engine.database.wal`.

A change is validated, appended to the log and fsynced, and only then applied in memory: when
``add`` returns, the batch survives a crash; a batch whose record is cut short is dropped whole on
the next open. ``checkpoint()`` writes the index and entries under a new generation and empties
the log (see storage.py for why a crash at any step loses nothing).
"""

from __future__ import annotations

import contextlib
import copy
import enum
import logging
import os
import shutil
import threading
import time
import uuid as uuid_mod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from knnclip.engine.database import storage as disk
from knnclip.engine.database.contents import Contents
from knnclip.engine.database.indexes import IndexSpec, build_index, faiss_metric, search_parameters, train_index
from knnclip.engine.database.lock import WriterLock
from knnclip.engine.database.manifest import MANIFEST_NAME, Manifest
from knnclip.engine.database.rerank_store import RerankStore
from knnclip.engine.database.storage import WAL_NAME
from knnclip.engine.database.vocabulary import ClassInfo, Vocabulary, split_label
from knnclip.engine.database.wal import (
    HEADER_BYTES,
    FellBehindError,
    LogContents,
    LogFollower,
    LogWriter,
    Record,
    RecordKind,
    create_log,
    encode_record,
    parse_records,
    read_log,
)
from knnclip.engine.errors import (
    BackendUnavailableError,
    DatabaseBusyError,
    DatabaseCorruptError,
    DatabaseExistsError,
    DatabaseNotTrainedError,
    DatabaseWriteError,
    InvalidInputError,
    ReadOnlyDatabaseError,
    UnknownClassError,
    UnknownEntryError,
)

__all__ = ["WAL_NAME", "Database", "EntryRecord", "FollowResult", "SearchResult"]

log = logging.getLogger("knnclip.engine.database")

_MAX_K = 1 << 16
_READER_RETRIES = 50  # a reader that keeps racing a writer's checkpoints retries this often


class DatabaseState(str, enum.Enum):
    """Where a :class:`Database` stands; each refusal says which and why."""

    WRITER = "writer"  # holds the writer lock: changes are accepted
    READ_ONLY = "read-only"  # opened with read_only=True: searches only
    FAILED = "failed"  # a writer whose change failed part-way: nothing more is accepted until reopened
    CLOSED = "closed"


class SearchResult(NamedTuple):
    """``sims[M, k]`` float32 (-inf where no neighbour), ``labels[M, k]`` and ``ids[M, k]`` int64 (-1 there)."""

    sims: np.ndarray
    labels: np.ndarray
    ids: np.ndarray


@dataclass(frozen=True)
class FollowResult:
    """What one :meth:`Database.follow` did: the log records it applied, the bytes it read to
    find them (the whole checkpoint's files when it had to reload), whether it reloaded, and
    the sequence number it stands at now."""

    records: int
    bytes_read: int
    reloaded: bool
    lsn: int


class Database:
    """A durable FAISS database of L2-normalised embeddings and their class ids.

    Create one with :meth:`create` or open one with :meth:`open`; do not call the constructor.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from knnclip.engine import Database
    >>> root = tempfile.mkdtemp()
    >>> rng = np.random.default_rng(0)
    >>> with Database.create(f"{root}/db", dim=8) as db:
    ...     ids = db.add(rng.normal(size=(3, 8)), ["cat", "cat", "wall,walls"])
    ...     sims, labels, found = db.search(rng.normal(size=(2, 8)), k=4)
    >>> ids.tolist(), labels.shape, int(labels[0, 3])
    ([0, 1, 2], (2, 4), -1)
    >>> with Database.open(f"{root}/db", read_only=True) as db:
    ...     db.classes, db.vocabulary.find("walls").name
    ({'cat': 2, 'wall': 1}, 'wall')
    """

    # Construction ----------------------------------------------------------------------------
    def __init__(self, _token: object, path: Path, manifest: Manifest, read_only: bool) -> None:
        if _token is not _CONSTRUCT:
            raise TypeError("use Database.create(...) or Database.open(...)")
        self.path = path
        self._manifest = manifest
        self._state = DatabaseState.READ_ONLY if read_only else DatabaseState.WRITER
        self._failure = ""  # why, when the state is FAILED
        self._mutex = threading.RLock()
        self._c = Contents(manifest)
        self._lock: WriterLock | None = None
        self._log: LogWriter | None = None
        self._log_state = LogContents(manifest.checkpoint_lsn, [], HEADER_BYTES, 0)  # set by replay
        self._follower: LogFollower | None = None  # a read-only handle's reader of the log, once it follows
        self._device, self._search_mode = "cpu", "fp32"  # what open() was asked for (a reload keeps them)
        #: A log larger than this triggers a checkpoint after the change that grew it.
        self.auto_checkpoint_bytes = 256 << 20
        self._checkpoint_deferred_until = 0  # log size; set when an automatic checkpoint failed

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        dim: int,
        *,
        metric: str = "cosine",
        index: str = "flat",
        storage: str | None = None,
        index_params: dict[str, Any] | None = None,
    ) -> Database:
        """Create an empty database directory at ``path`` and open it for writing.

        Parameters
        ----------
        dim : int
            Embedding size (1536 for DINOv2 ViT-g/14 keys).
        metric : {"cosine", "ip"}
            ``cosine`` L2-normalises what is added and searched, so inner products are cosines.
        index : {"flat", "ivf-flat", "ivf-pq", "hnsw"}
            ``flat`` is exact. The others are approximate and, except hnsw with fp16/fp32, need
            :meth:`train` before the first add.
        storage : {"fp16", "fp32", "sq8"}, optional
            How vectors are stored; default ``fp16`` (``ivf-pq`` always stores PQ codes).
        index_params : dict, optional
            ``nlist``, ``nprobe`` (IVF); ``m``, ``nbits`` (PQ); ``M``, ``ef_construction``, ``ef_search`` (HNSW).
        """
        target = Path(path)
        if target.exists():
            raise DatabaseExistsError(f"{target} already exists; open it with Database.open or choose a new path")
        if not isinstance(dim, int | np.integer) or isinstance(dim, bool) or dim < 1:
            raise InvalidInputError(f"dim must be a positive integer, got {dim!r}")
        faiss_metric(metric)
        spec = IndexSpec.make(index, storage, index_params, int(dim))
        db = cls(_CONSTRUCT, target, disk.empty_manifest(int(dim), metric, spec), read_only=True)
        if not spec.needs_training:
            db._c.index = build_index(spec, db._c.dim, metric)
        db._write_directory(target, db._manifest.uuid, generation=1)
        db._state = DatabaseState.CLOSED
        return cls.open(target)

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, device: str = "cpu", read_only: bool = False, search: str = "fp32"
    ) -> Database:
        """Open a database: verify every file, replay the log, and take the writer lock unless ``read_only``.

        ``device="cuda"`` searches a GPU copy of the index; ``search="bf16"`` searches a flat index
        in bfloat16 on the CPU (OpenVINO; ``database/bf16_search.py``); the faiss index stays what
        is stored either way.

        Raises DatabaseCorruptError (naming the file) on a damaged, truncated or foreign file,
        DatabaseLockedError when another writer has it open. Read-only opens share the database
        with one writer and see the state at the moment they open.
        """
        directory = Path(path)
        if device not in ("cpu", "cuda"):
            raise InvalidInputError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if search not in ("fp32", "bf16") or (search == "bf16" and device != "cpu"):
            raise InvalidInputError(f"search must be 'fp32', or 'bf16' on the CPU, got {search!r} on {device!r}")
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: no such database directory (create it with Database.create)")
        lock = None if read_only else WriterLock(directory)
        try:
            db = cls._load(directory, read_only, retry=read_only)
            db._attach(lock, device, search)  # noqa: SLF001 - the instance this constructor is making
            return db
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    def _attach(self, lock: WriterLock | None, device: str, search: str) -> None:
        """What :meth:`open` adds to the loaded contents: a writer's lock and log (and the rewrite
        of an older log format), and the search mirror on the GPU or in bf16."""
        self._lock = lock
        self._device, self._search_mode = device, search
        if self._state is DatabaseState.WRITER:
            self._log = LogWriter(self.path / WAL_NAME, self._log_state.valid_end)
            if self._log.tail_kept is not None:
                log.warning("%s: the torn tail of the log is kept in %s", self.path / WAL_NAME, self._log.tail_kept)
            disk.remove_stale_files(self.path, self._manifest)
            # An older log format, or a checkpoint from before provenance was kept: the first
            # writer rewrites them in the current format.
            if self._log_state.version < 2 or "provenance" not in self._manifest.files:
                self.checkpoint()
        else:
            # A reader holds the log open from the start, so follow() reads on from where the open
            # read up to even when a checkpoint replaces the log before the first follow.
            with contextlib.suppress(FellBehindError):
                self._follower = self._new_follower()
        self._c.mirror = self._open_mirror(self._c)

    def _open_mirror(self, contents: Contents) -> Any:
        """The search mirror open() was asked for (on the GPU, in bf16) over ``contents``, or None."""
        if self._device == "cuda":
            from knnclip.engine.database.gpu import open_gpu_mirror

            return open_gpu_mirror(contents.spec, contents.dim, contents.index)
        if self._search_mode == "bf16":
            from knnclip.engine.database.bf16_search import Bf16SearchMirror

            return Bf16SearchMirror(contents.spec, contents.dim, contents.index)
        return None

    def follow(self) -> FollowResult:
        """Bring a read-only handle up to date with the database's writer, in place.

        Applies the log records the writer appended since this handle last read, through the
        same code as replay, reading only their bytes: the cost is the change's, not the
        database's. A checkpoint does not interrupt it (the handle keeps its state and moves to
        the new log). Only when the records it needs are gone (the log was replaced twice since
        it last read, or the database was replaced) does it load the latest checkpoint, and it
        swaps it in whole: searches see the old state or the new one, never a mix.
        """
        with self._mutex:
            self._check_open()
            if self._state is not DatabaseState.READ_ONLY:
                raise InvalidInputError(f"{self.path}: follow() is for read-only handles; a writer is always current")
            try:
                if self._follower is None:
                    self._follower = self._new_follower()
                records, read = self._follower.read()
            except FellBehindError as exc:
                log.info("%s: %s; loading the latest checkpoint", self.path, exc)
                return self._reload()
            self._c.apply_all(records, self.path / WAL_NAME)
            return FollowResult(len(records), read, False, self._c.lsn)

    # Replicas without a shared file system ------------------------------------------------------
    def copy_for_replica(self, path: str | os.PathLike[str]) -> int:
        """Write the current state as a database at ``path`` (which must not exist) that keeps
        this one's identity and sequence numbers, and return the sequence number it holds: a
        replica elsewhere starts from it and then applies :meth:`records_since` that number.
        (:meth:`snapshot` makes an independent database instead.)"""
        with self._mutex:
            self._check_open()
            target = Path(path)
            if target.exists():
                raise DatabaseExistsError(f"{target} already exists; a replica's copy goes to a new path")
            self._write_directory(target, self._manifest.uuid, generation=1, lsn=self._c.lsn)
            return int(self._c.lsn)

    def records_since(self, lsn: int) -> bytes | None:
        """The changes after sequence number ``lsn``, as log records (what :meth:`apply_records`
        takes), read from this database's log; None when the log no longer holds them all (a
        checkpoint emptied it since): the replica then starts again from :meth:`copy_for_replica`."""
        with self._mutex:
            self._check_open()
            if lsn > self._c.lsn:
                raise InvalidInputError(
                    f"{self.path}: records since {lsn} asked, but this database stands at {self._c.lsn} "
                    "(the replica's copy is of another database, or of a state this one never reached)"
                )
            logged = read_log(self.path / WAL_NAME, self._manifest.uuid)
            if lsn < logged.base_lsn:
                return None
            return b"".join(encode_record(r.lsn, r.kind, r.meta, r.body) for r in logged.records if r.lsn > lsn)

    def apply_records(self, data: bytes) -> FollowResult:
        """Apply to this read-only copy the records a writer elsewhere gave by
        :meth:`records_since` this copy's :attr:`lsn`, through the same code as replay. Damaged or
        cut-short data is a DatabaseCorruptError and changes nothing."""
        with self._mutex:
            self._check_open()
            if self._state is not DatabaseState.READ_ONLY:
                raise InvalidInputError(f"{self.path}: apply_records is for read-only copies; a writer logs its own")
            source = Path(f"<records after {self._c.lsn}>")
            records = parse_records(data, self._c.lsn + 1, source)
            try:
                self._c.apply_all(records, source)
            except DatabaseCorruptError as exc:
                self._fail(f"{exc}: start the copy again")
                raise
            return FollowResult(len(records), len(data), False, self._c.lsn)

    def _new_follower(self) -> LogFollower:
        s = self._log_state
        return LogFollower(self.path / WAL_NAME, self._manifest.uuid, s.base_lsn, s.valid_end, self._c.lsn)

    def _reload(self) -> FollowResult:
        fresh = Database._load(self.path, read_only=True, retry=True)
        contents = fresh._c  # noqa: SLF001 - a Database this method made
        contents.mirror = self._open_mirror(contents)
        self._c, self._manifest = contents, fresh._manifest  # noqa: SLF001
        self._log_state = fresh._log_state  # noqa: SLF001
        if self._follower is not None:
            self._follower.close()
            self._follower = None
        with contextlib.suppress(FellBehindError):  # replaced again meanwhile: the next follow reloads
            self._follower = self._new_follower()
        read = sum(f.bytes for f in self._manifest.files.values()) + self._log_state.valid_end
        return FollowResult(0, read, True, self._c.lsn)

    @classmethod
    def convert(
        cls,
        source: str | os.PathLike[str],
        target: str | os.PathLike[str],
        *,
        index: str,
        storage: str | None = None,
        index_params: dict[str, Any] | None = None,
        train_size: int = 50_000,
        batch: int = 10_000,
        seed: int = 0,
        select: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> Database:
        """Rebuild the database at ``source`` into a new one at ``target`` with another index kind,
        storage or parameters; return it, open for writing.

        The same vocabulary (class ids included), entries (their ids, classes and where each
        came from) and vectors as ``source`` stores them (decoded: an sq8 source gives sq8's
        values). An index that needs training is trained on a random sample of ``train_size``
        of them. ``select`` keeps only some entries: given the entry ids, it returns a boolean
        mask of those to copy (a shard's, say). ``source`` must keep its vectors (flat, hnsw,
        ivf-rabitq). ``target`` appears whole or not at all: a failure removes what was written
        of it.
        """
        dst_path = Path(target)
        with cls.open(source, read_only=True) as src:
            c = src._c  # noqa: SLF001 - a Database this method opened
            if not c.spec.positional and c.store is None:
                raise InvalidInputError(
                    f"{src.path}: a {c.spec.kind} index keeps no vectors to rebuild from; convert from a flat, "
                    "hnsw or ivf-rabitq database (or add the original embeddings again)"
                )
            dst = cls.create(
                dst_path, src.dim, metric=src.metric, index=index, storage=storage, index_params=index_params
            )
            try:
                for info in sorted(c.vocab.values(), key=lambda i: i.id):
                    dst._commit(RecordKind.PUT_CLASS, {"class": info.to_json()})  # noqa: SLF001 - same class
                ids, labels, provenance = c.ids, c.labels, c.provenance
                if select is not None:
                    chosen = np.asarray(select(ids.copy()), bool)
                    ids, labels, provenance = ids[chosen], labels[chosen], provenance.kept(chosen)
                if dst.index_spec.needs_training and len(ids):
                    rng = np.random.default_rng(seed)
                    sample = np.sort(rng.choice(len(ids), min(train_size, len(ids)), replace=False))
                    dst.train(src.vectors(ids[sample]))
                for chunk in _add_runs(ids, provenance.time, batch):
                    p = provenance.kept(chunk)
                    used = np.unique(p.source[p.source >= 0])
                    remap = np.full(len(p.names) + 1, -1, np.int64)
                    remap[used] = np.arange(len(used))
                    meta = {
                        "first_id": int(ids[chunk[0]]),
                        "n": len(chunk),
                        "dim": src.dim,
                        "classes": [],
                        "provenance": {
                            "sources": [p.names[i] for i in used],
                            "of": remap[p.source].tolist(),
                            "mask": p.mask.tolist(),
                            "time": float(p.time[0]),
                        },
                    }
                    vectors = np.ascontiguousarray(src.vectors(ids[chunk]), np.float32)
                    dst._commit(RecordKind.ADD, meta, labels[chunk].tobytes(), vectors.tobytes())  # noqa: SLF001
                dst.checkpoint()
            except BaseException:
                dst.close(checkpoint=False)
                shutil.rmtree(dst_path, ignore_errors=True)
                raise
        return dst

    @classmethod
    def _load(cls, directory: Path, read_only: bool, retry: bool) -> Database:
        for attempt in range(_READER_RETRIES if retry else 1):
            before = disk.read_or_none(directory / MANIFEST_NAME)
            try:
                manifest = Manifest.read(directory)
                db = cls(_CONSTRUCT, directory, manifest, read_only)
                db._c = disk.load_checkpoint(directory, manifest)
                db._log_state = disk.replay(directory, manifest, db._c)
                return db
            except (DatabaseCorruptError, FileNotFoundError):
                # A reader may race a writer's checkpoint (files replaced under it): if the manifest
                # changed meanwhile, read again; if not, the damage is real.
                if not retry or disk.read_or_none(directory / MANIFEST_NAME) == before:
                    raise
                if attempt + 1 < _READER_RETRIES:
                    time.sleep(min(0.001 * attempt, 0.02))  # let the checkpoint finish
                    continue
                raise DatabaseBusyError(
                    f"{directory}: a writer replaced its files {_READER_RETRIES} times while this read-only open "
                    "read them; nothing is damaged: retry when the writer checkpoints less often"
                ) from None
        raise AssertionError("unreachable")

    # Read-only views -------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._c.dim

    @property
    def metric(self) -> str:
        return self._c.metric

    @property
    def index_spec(self) -> IndexSpec:
        return self._c.spec

    @property
    def state(self) -> DatabaseState:
        return self._state

    @property
    def read_only(self) -> bool:
        """True unless this is a writer that accepts changes (read-only, failed or closed)."""
        return self._state is not DatabaseState.WRITER

    @property
    def is_trained(self) -> bool:
        return self._c.is_trained

    @property
    def vocabulary(self) -> Vocabulary:
        """A copy of the vocabulary: class id -> ClassInfo (name, synonyms); ``find(name)`` looks up."""
        with self._mutex:
            return self._c.vocab.copy()

    @property
    def classes(self) -> dict[str, int]:
        """Class name -> number of entries, for every class in the vocabulary (in id order)."""
        with self._mutex:
            return self._c.class_counts()

    def __len__(self) -> int:
        return len(self._c.ids)

    @property
    def lsn(self) -> int:
        """The sequence number of the last change this handle applied: equal numbers, equal contents
        (a copy kept elsewhere, e.g. on a GPU, is current while it matches)."""
        return int(self._c.lsn)

    def ids_and_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of (entry ids, class ids) of every stored vector, in index order."""
        with self._mutex:
            return self._c.ids.copy(), self._c.labels.copy()

    def entries(
        self, class_name: str | None = None, source: str | None = None, *, offset: int = 0, limit: int | None = None
    ) -> list[EntryRecord]:
        """The entries, in the order they were added, as records of where each came from: all, or
        those of ``class_name`` and/or added from ``source``; ``offset`` and ``limit`` page them."""
        if offset < 0 or (limit is not None and limit < 0):
            raise InvalidInputError(f"offset and limit are >= 0, got {offset} and {limit}")
        with self._mutex:
            c = self._c
            chosen = np.ones(len(c.ids), bool)
            if class_name is not None:
                chosen &= c.labels == self._class(class_name).id
            if source is not None:
                from_source = np.zeros(len(c.ids), bool)
                from_source[c.provenance.where_source(source)] = True
                chosen &= from_source
            positions = np.flatnonzero(chosen)[offset : None if limit is None else offset + limit]
            p = c.provenance
            return [
                EntryRecord(
                    id=int(c.ids[i]),
                    class_name=c.vocab[int(c.labels[i])].name,
                    source=p.source_of(int(i)),
                    mask=int(p.mask[i]) if p.mask[i] >= 0 else None,
                    time=float(p.time[i]) if np.isfinite(p.time[i]) else None,
                )
                for i in positions
            ]

    def remove_source(self, source: str) -> int:
        """Delete every entry added from ``source``; return how many went (0 when none was).
        Every other entry is untouched."""
        with self._mutex:
            self._check_writable()
            ids = self._c.ids[self._c.provenance.where_source(source)]
            if len(ids):
                self._commit(RecordKind.REMOVE_ENTRIES, {"n": len(ids)}, ids.tobytes())
            return len(ids)

    def vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored (decoded) vectors of entry ``ids``, float32 [n, dim]: flat and hnsw indexes,
        and ivf-rabitq's re-rank store."""
        with self._mutex:
            self._check_open()
            if not self._c.spec.positional and self._c.store is None:
                raise InvalidInputError(
                    f"vectors() is not available for {self._c.spec.kind} indexes (they keep no vectors to read back)"
                )
            want = np.asarray(ids, dtype=np.int64).reshape(-1)
            pos = np.searchsorted(self._c.ids, want)
            found = pos < len(self._c.ids)
            found[found] = self._c.ids[pos[found]] == want[found]
            if not found.all():
                raise InvalidInputError(f"no entries with ids {want[~found][:10].tolist()} in {self.path}")
            out = np.empty((len(pos), self._c.dim), np.float32)
            if not len(pos):
                return out
            if self._c.store is not None:
                return self._c.store.vectors(pos)
            index = self._c.index
            assert index is not None  # entries exist, so the index does
            if np.array_equal(pos, np.arange(pos[0], pos[0] + len(pos))):  # a run: one call
                return np.asarray(index.reconstruct_n(int(pos[0]), len(pos)), np.float32).reshape(len(pos), -1)
            for row, p in enumerate(pos.tolist()):
                out[row] = index.reconstruct(int(p))
            return out

    def __repr__(self) -> str:
        mode = self._state.value
        return (
            f"Database({str(self.path)!r}, {len(self._c.ids)} entries, {len(self._c.vocab)} classes, "
            f"{self._c.spec.kind}/{self._c.spec.storage}, dim={self._c.dim}, {mode})"
        )

    # Changes ---------------------------------------------------------------------------------
    def add(
        self,
        embeddings: np.ndarray,
        labels: Sequence[str] | np.ndarray,
        sources: str | Sequence[str | None] | None = None,
        mask_indices: Sequence[int] | np.ndarray | None = None,
    ) -> np.ndarray:
        """Store ``embeddings[N, D]`` with their class ``labels``; return their new entry ids (int64 [N]).

        Labels are class names (a new name creates a class; ``"wall,walls"`` gives synonyms) or
        existing class ids. ``sources`` says where the entries came from (an image's file name, an
        upload's id): one string for all, or one per entry, and ``mask_indices`` each entry's mask
        in its image (default: its index in this call); :meth:`entries` lists them with the time,
        and :meth:`remove_source` undoes a source. Nothing already stored changes. Durable when
        this returns.
        """
        with self._mutex:
            self._check_writable()
            vectors = self._validated_vectors(embeddings, "embeddings")
            n = len(vectors)
            class_ids, changed = self._resolve_labels(labels, n)
            provenance = _provenance_meta(sources, n)
            if mask_indices is not None:
                masks = np.asarray(mask_indices)
                if masks.shape != (n,) or masks.dtype.kind not in "iu" or (n and masks.min() < 0):
                    raise InvalidInputError(
                        f"mask_indices are {n} non-negative integers, got {masks.dtype} {masks.shape}"
                    )
                provenance["mask"] = masks.tolist()
            if n == 0:
                return np.zeros(0, np.int64)
            if not self.is_trained:
                raise DatabaseNotTrainedError(
                    f"{self.path}: the {self._c.spec.kind}/{self._c.spec.storage} index must be trained first: "
                    f"db.train(samples) with at least {self._c.spec.min_training_points()} representative vectors"
                )
            first = self._c.next_id
            classes = [c.to_json() for c in changed]
            meta = {"first_id": first, "n": n, "dim": self._c.dim, "classes": classes, "provenance": provenance}
            self._commit(RecordKind.ADD, meta, class_ids.tobytes(), vectors.tobytes())
            return np.arange(first, first + n, dtype=np.int64)

    def add_class(self, name: str, synonyms: Sequence[str] = (), *, thing: bool | None = None) -> ClassInfo:
        """Register a class (or add synonyms to an existing one, or set whether it is a ``thing``)
        without entries; return it."""
        with self._mutex:
            self._check_writable()
            info = self._c.vocab.plan(name, tuple(synonyms), thing)
            if self._c.vocab.get(info.id) != info:
                self._commit(RecordKind.PUT_CLASS, {"class": info.to_json()})
            return info

    def remove_class(self, name: str | int) -> int:
        """Delete a class and every entry of it; return how many entries went. Other classes are untouched."""
        if isinstance(name, str) and "," in name:  # "a,b" adds synonyms; a removal names one class
            raise InvalidInputError(f"remove_class takes one class name, not the list {name!r}")
        with self._mutex:
            self._check_writable()
            info = self._c.vocab[name] if isinstance(name, int | np.integer) else self._c.vocab.get_by_name(name)
            removed = self._c.counts.get(info.id, 0)
            self._commit(RecordKind.REMOVE_CLASS, {"class_id": info.id})
            return removed

    def remove_entries(self, ids: Sequence[int] | np.ndarray) -> int:
        """Delete the entries ``ids`` (as :meth:`add` returned them); return how many went. An id
        that is not in the database is refused by name and nothing is removed. Every other entry,
        of every class, is untouched."""
        wanted = np.asarray(ids)
        if wanted.dtype.kind not in "iu" and wanted.size:
            raise InvalidInputError(f"entry ids are integers, got {wanted.dtype}")
        wanted = np.unique(wanted.astype(np.int64).ravel())
        with self._mutex:
            self._check_writable()
            missing = wanted[~np.isin(wanted, self._c.ids)]
            if len(missing):
                shown = ", ".join(str(i) for i in missing[:8]) + (", ..." if len(missing) > 8 else "")
                raise UnknownEntryError(f"{self.path}: no entries with ids {shown}; nothing was removed")
            if len(wanted):
                self._commit(RecordKind.REMOVE_ENTRIES, {"n": len(wanted)}, wanted.tobytes())
            return len(wanted)

    def rename_class(self, old: str | int, new: str) -> ClassInfo:
        """Give class ``old`` (a name, synonym or id) the name ``new``, keeping its id, its entries
        and its other synonyms (``new`` leaves them if it was one). A name another class has is
        refused: :meth:`merge_classes` joins two classes."""
        with self._mutex:
            self._check_writable()
            info = self._class(old)
            name, extra = split_label(new)
            if extra:
                raise InvalidInputError(f"rename_class takes one new name, not the list {new!r}")
            owner = self._c.vocab.find(name)
            if owner is not None and owner.id != info.id:
                raise InvalidInputError(
                    f"{name!r} already names class {owner.name!r} (id {owner.id}); merge_classes({info.name!r}, "
                    f"{owner.name!r}) joins the two"
                )
            renamed = ClassInfo(info.id, name, tuple(s for s in info.synonyms if s != name), info.thing)
            if renamed != info:
                self._commit(RecordKind.PUT_CLASS, {"class": renamed.to_json()})
            return renamed

    def merge_classes(self, source: str | int, target: str | int) -> ClassInfo:
        """Move every entry of class ``source`` into class ``target``, with ``source``'s name and
        synonyms as synonyms of ``target``, and remove ``source``; return ``target`` as it is
        now. The entries themselves, and every other class, are untouched."""
        with self._mutex:
            self._check_writable()
            src, dst = self._class(source), self._class(target)
            if src.id == dst.id:
                raise InvalidInputError(f"{source!r} and {target!r} are the same class ({dst.name!r})")
            _, synonyms = split_label(dst.name, (*dst.synonyms, *src.names))
            merged = ClassInfo(dst.id, dst.name, synonyms, dst.thing)
            self._commit(RecordKind.MERGE_CLASSES, {"source": src.id, "class": merged.to_json()})
            return merged

    def _class(self, name: str | int) -> ClassInfo:
        if isinstance(name, int | np.integer):
            return self._c.vocab[int(name)]
        if "," in name:
            raise InvalidInputError(f"name one class, not the list {name!r}")
        return self._c.vocab.get_by_name(name)

    def train(self, samples: np.ndarray) -> None:
        """Train the index (IVF centroids, PQ codebooks, sq8 ranges) on representative vectors.

        Only while the database is empty. Use vectors like the ones you will add (e.g. a sample of
        the dataset's mask embeddings); the result is checkpointed before this returns.
        """
        with self._mutex:
            self._check_writable()
            if len(self._c.ids):
                raise InvalidInputError(f"{self.path}: train() needs an empty database ({len(self._c.ids)} entries)")
            x = self._validated_vectors(samples, "samples")
            need = self._c.spec.min_training_points()
            if len(x) < need:
                raise InvalidInputError(
                    f"training a {self._c.spec.kind}/{self._c.spec.storage} index needs >= {need} vectors"
                )
            spec = self._c.spec.resolved_for(len(x), self._c.dim)
            index = build_index(spec, self._c.dim, self._c.metric)
            train_index(index, spec, x)
            # The trained index becomes the database's only once its checkpoint is on disk.
            trained = copy.copy(self._c)
            trained.spec, trained.index = spec, index
            trained.store = RerankStore.trained(spec.storage, x) if spec.rerank_store else None
            self._checkpoint(trained, "write the trained index")
            self._c = trained
            if self._c.mirror is not None:
                self._c.mirror.rebuild(self._c.index)

    def checkpoint(self) -> None:
        """Write the index and entries atomically under a new generation and empty the log.

        Raises DatabaseWriteError when the new generation cannot be written; the database is then
        unchanged (its last checkpoint and log still hold everything)."""
        with self._mutex:
            self._check_writable()
            self._checkpoint(self._c, "write a checkpoint")

    def _checkpoint(self, contents: Contents, action: str) -> None:
        old = set(f.name for f in self._manifest.files.values())
        generation = self._manifest.generation + 1
        try:
            manifest = self._write_directory(self.path, self._manifest.uuid, generation, contents=contents)
        except (OSError, RuntimeError) as exc:  # RuntimeError: FAISS's own write errors
            disk.remove_generation(self.path, generation)
            raise DatabaseWriteError(self.path, action, exc) from exc
        # The manifest is the switch-over point: from here the checkpoint is durable.
        self._manifest = manifest
        if contents.store is not None:
            disk.reopen_store(self.path, manifest, contents.store, str(contents.spec.params["store"]))
        try:
            create_log(self.path / WAL_NAME, manifest.uuid, contents.lsn)
        except OSError as exc:
            # The old log still covers the checkpoint (its records up to it are skipped on replay),
            # so appending to it stays correct; the next checkpoint empties it.
            log.warning("%s: checkpoint written, but the log could not be emptied (%s)", self.path, exc)
        else:
            assert self._log is not None  # a writer's checkpoint
            self._log.close()
            self._log = LogWriter(self.path / WAL_NAME, HEADER_BYTES)
        for name in old - {f.name for f in manifest.files.values()}:
            with contextlib.suppress(OSError):
                (self.path / name).unlink()

    def snapshot(self, path: str | os.PathLike[str]) -> None:
        """Write a consistent copy of the current state as a new database at ``path`` (must not exist)."""
        with self._mutex:
            self._check_open()
            target = Path(path)
            if target.exists():
                raise DatabaseExistsError(f"{target} already exists; snapshots go to a new path")
            self._write_directory(target, uuid_mod.uuid4(), generation=1, lsn=0)

    def close(self, *, checkpoint: bool | None = None) -> None:
        """Release the database (and the writer lock).

        ``checkpoint=None`` checkpoints a writer whose log has grown past a quarter of the index
        file (so the next open replays little); True always, False never (the log is kept and
        replayed on the next open).
        """
        with self._mutex:
            if self._state is DatabaseState.CLOSED:
                return
            try:
                # (a failed writer's memory is not what its log says: the next open replays the log)
                wants = checkpoint is not False and self._state is DatabaseState.WRITER
                if self._log is not None and self._log.size > HEADER_BYTES and wants:
                    index_rec = self._manifest.files.get("index")
                    if checkpoint or index_rec is None or self._log.size * 4 >= index_rec.bytes:
                        self.checkpoint()
            finally:
                self._state = DatabaseState.CLOSED
                if self._log is not None:
                    self._log.close()
                if self._follower is not None:
                    self._follower.close()
                if self._lock is not None:
                    self._lock.release()
                self._c.index = self._c.mirror = None

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Search ----------------------------------------------------------------------------------
    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
        rerank: int | None = None,
    ) -> SearchResult:
        """The ``k`` most similar entries of each query: ``(sims, labels, ids)``, each [M, k], best first.

        Where fewer than k entries exist (or a cosine query is all zeros, e.g. an empty mask),
        labels and ids are -1 and sims -inf. ``nprobe``/``ef_search`` override the index's defaults;
        ``rerank`` (ivf-rabitq) how many candidates are re-scored from the store (0: none, the
        codes' estimates are returned).
        """
        if rerank is not None and (not isinstance(rerank, int | np.integer) or isinstance(rerank, bool) or rerank < 0):
            raise InvalidInputError(f"rerank must be an integer >= 0, got {rerank!r}")
        if not isinstance(k, int | np.integer) or isinstance(k, bool) or not 1 <= k <= _MAX_K:
            raise InvalidInputError(f"k must be an integer in [1, {_MAX_K}], got {k!r}")
        q = self._validated_vectors(queries, "queries", allow_zero=True)
        with self._mutex:
            self._check_open()
            params = search_parameters(self._c.spec, nprobe, ef_search)
            depth = int(self._c.spec.params.get("rerank", 0) if rerank is None else rerank)
            return SearchResult(*self._c.search(q, k, params, depth))

    @property
    def device_search(self) -> str | None:
        """Where :meth:`search_device` searches (the GPU copy's device), or None: the database was
        not opened with ``device="cuda"``."""
        mirror = self._c.mirror
        return str(mirror.device) if mirror is not None and hasattr(mirror, "search_device") else None

    def search_device(
        self, queries: Any, k: int, *, nprobe: int | None = None, ef_search: int | None = None
    ) -> tuple[Any, Any]:
        """:meth:`search` for queries that are already on the GPU copy's device (a torch tensor
        [M, dim]): ``(sims, labels)`` as tensors there, so the queries never leave the device
        (faiss-gpu reads them in place). Needs the database opened with ``device="cuda"``; a search
        faiss-gpu cannot make (k or nprobe past 2048) is a BackendUnavailableError: use :meth:`search`."""
        if not isinstance(k, int | np.integer) or isinstance(k, bool) or not 1 <= k <= _MAX_K:
            raise InvalidInputError(f"k must be an integer in [1, {_MAX_K}], got {k!r}")
        with self._mutex:
            self._check_open()
            params = search_parameters(self._c.spec, nprobe, ef_search)
            mirror = self._c.mirror
            if mirror is None or not hasattr(mirror, "search_device") or not mirror.can_search(k, params):
                raise BackendUnavailableError(
                    f"{self.path}: search_device needs the database opened with device='cuda' (faiss-gpu, or torch "
                    "for a flat index) and k and nprobe within faiss-gpu's 2048; use search()"
                )
            return self._c.search_device(self._device_queries(queries), k, params)

    def _device_queries(self, queries: Any) -> Any:
        """Queries on a device checked as :meth:`search` checks them (shape, NaN/Inf) and, for a
        cosine database, normalised there (a zero row stays zero: it has no neighbours)."""
        import torch

        if not isinstance(queries, torch.Tensor) or queries.ndim != 2 or queries.shape[1] != self._c.dim:
            raise InvalidInputError(
                f"queries must be a torch tensor [N, {self._c.dim}], got {type(queries).__name__} "
                f"{list(getattr(queries, 'shape', []))}"
            )
        if not queries.is_floating_point():
            raise InvalidInputError(f"queries must be a float tensor, got {queries.dtype}")
        q = queries.float()
        if not bool(torch.isfinite(q).all()):
            raise InvalidInputError("queries contain NaN or Inf (or overflow float32)")
        if self._c.metric == "cosine":
            norms = torch.linalg.vector_norm(q, dim=1, keepdim=True)
            q = q / torch.where(norms == 0, torch.ones_like(norms), norms)
        return q

    # Statistics ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Entries, classes, index type and parameters, bytes per entry (codes and on disk), log size."""
        with self._mutex:
            # What this handle opened: the files of its checkpoint and the log as it read it. A
            # writer's checkpoint may replace them under a reader meanwhile; sizes come from the
            # manifest, so nothing here races it.
            log_bytes = self._log.size if self._log is not None else self._log_state.valid_end
            disk = sum(f.bytes for f in self._manifest.files.values()) + log_bytes
            n = len(self._c.ids)
            resident = self._c.resident_bytes()
            store = self._c.store
            return {
                "path": str(self.path),
                "entries": n,
                "classes": len(self._c.vocab),
                "dim": self._c.dim,
                "metric": self._c.metric,
                "index": self._c.spec.kind,
                "storage": self._c.spec.storage,
                "params": dict(self._c.spec.params),
                "trained": self.is_trained,
                "code_bytes_per_entry": self._c.spec.code_bytes(self._c.dim),
                "disk_bytes": disk,
                "disk_bytes_per_entry": disk / n if n else None,
                # what this process holds in memory for the database, by part
                "resident_bytes": sum(resident.values()),
                "resident_bytes_per_entry": sum(resident.values()) / n if n else None,
                "resident_parts": resident,
                "store": None
                if store is None
                else {
                    "precision": store.precision,
                    "place": self._c.spec.params["store"],
                    "rows": store.total_rows,
                    "disk_bytes": store.disk_segment_bytes(),
                    "resident_bytes": resident["store"],
                    "rerank": self._c.spec.params["rerank"],
                },
                "log_bytes": log_bytes,
                # bytes of a write a crash cut short after the last complete record (a writer
                # keeps them aside and cuts them when it opens)
                "log_torn_bytes": self._log_state.torn_bytes if self._log is None else 0,
                "log_tail_kept": str(self._log.tail_kept) if self._log is not None and self._log.tail_kept else None,
                "lsn": self._c.lsn,
                "checkpoint_lsn": self._manifest.checkpoint_lsn,
                "device": self._c.mirror.device if self._c.mirror is not None else "cpu",
                "search": type(self._c.mirror).__name__ if self._c.mirror is not None else "faiss",
                "read_only": self.read_only,
                "state": self._state.value,
                "uuid": str(self._manifest.uuid),
            }

    # Internals -------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._state is DatabaseState.CLOSED:
            raise ReadOnlyDatabaseError(f"{self.path}: the database is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._state is DatabaseState.READ_ONLY:
            raise ReadOnlyDatabaseError(f"{self.path}: opened read_only=True; open it without read_only to change it")
        if self._state is DatabaseState.FAILED:
            raise ReadOnlyDatabaseError(
                f"{self.path}: this writer takes no more changes: {self._failure}; close and reopen the database "
                "(the log replays every change that was made durable)"
            )

    def _fail(self, why: str) -> None:
        self._state, self._failure = DatabaseState.FAILED, why

    def _validated_vectors(self, x: Any, what: str, allow_zero: bool = False) -> np.ndarray:
        arr = np.asarray(x)
        if arr.dtype.kind != "f":
            raise InvalidInputError(f"{what} must be a float array (float16/32/64), got dtype {arr.dtype}")
        if arr.ndim != 2 or arr.shape[1] != self._c.dim:
            raise InvalidInputError(f"{what} must have shape [N, {self._c.dim}], got {list(arr.shape)}")
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes Inf, reported below
            arr = np.ascontiguousarray(arr, dtype=np.float32)
        finite = np.isfinite(arr).all(axis=1)
        if not finite.all():
            rows = np.flatnonzero(~finite)[:5].tolist()
            raise InvalidInputError(f"{what} rows {rows} contain NaN or Inf (or overflow float32)")
        if self._c.metric == "cosine":
            norms = np.linalg.norm(arr, axis=1, keepdims=True)
            zero = norms[:, 0] == 0
            if zero.any() and not allow_zero:
                raise InvalidInputError(
                    f"{what} rows {np.flatnonzero(zero)[:5].tolist()} are zero vectors, which have no direction"
                )
            arr = arr / np.where(norms == 0, 1, norms)
        return arr

    def _resolve_labels(self, labels: Any, n: int) -> tuple[np.ndarray, list[ClassInfo]]:
        """Class ids for ``labels`` and the classes that must be created or extended first."""
        if isinstance(labels, str):
            raise InvalidInputError("labels must be a sequence with one label per embedding, not a single string")
        arr = np.asarray(labels)
        if arr.ndim != 1 or len(arr) != n:
            raise InvalidInputError(f"labels must be one per embedding: {n} embeddings, labels of shape {arr.shape}")
        if n == 0:
            return np.zeros(0, np.int64), []
        if arr.dtype.kind in "iu":
            unknown = sorted(set(np.unique(arr).tolist()) - set(self._c.vocab))
            if unknown:
                raise UnknownClassError(f"class ids {unknown[:10]} are not in the vocabulary; add them by name")
            return arr.astype(np.int64), []
        if arr.dtype.kind not in "UO" or not all(isinstance(v, str) for v in arr.tolist()):
            raise InvalidInputError(f"labels must be class names (str) or class ids (int), got dtype {arr.dtype}")
        scratch = self._c.vocab.copy()
        changed: dict[int, ClassInfo] = {}
        out = np.empty(n, np.int64)
        for i, label in enumerate(arr.tolist()):
            info = scratch.plan(label)
            if scratch.get(info.id) != info:
                scratch.put(info)
                changed[info.id] = info
            out[i] = info.id
        return out, list(changed.values())

    def _commit(self, kind: RecordKind, meta: dict[str, Any], *body: bytes) -> None:
        """Log (durably), then apply. The caller has validated everything that could fail in apply."""
        record_bytes = encode_record(self._c.lsn + 1, kind, meta, *body)
        wal = self._log
        assert wal is not None  # _check_writable passed: a writer has its log
        try:
            wal.append(record_bytes)
        except OSError as exc:
            if wal.broken:
                self._fail(f"a record only partly written to {wal.path} could not be cut off ({exc})")
                raise DatabaseWriteError(
                    wal.path,
                    "append to the log",
                    exc,
                    "the partial record could not be cut off, so nothing more is written; nothing was applied",
                ) from exc
            raise DatabaseWriteError(wal.path, "append to the log", exc) from exc
        try:
            self._c.apply(Record(self._c.lsn + 1, kind, meta, memoryview(b"".join(body))))
        except BaseException as exc:
            # The log has the change but memory does not: refuse further use rather than diverge.
            self._fail(f"a change was logged but could not be applied in memory ({type(exc).__name__}: {exc})")
            raise
        if wal.size > max(self.auto_checkpoint_bytes, self._checkpoint_deferred_until):
            # The change is durable and applied: a checkpoint that fails now must not make the
            # caller think it was not (a retry would store it twice). Try again once the log
            # has grown by as much again.
            try:
                self.checkpoint()
            except DatabaseWriteError as exc:
                self._checkpoint_deferred_until = wal.size + self.auto_checkpoint_bytes
                log.warning("%s; the change itself is stored (in the log)", exc)
            else:
                self._checkpoint_deferred_until = 0

    def _write_directory(
        self,
        directory: Path,
        db_uuid: uuid_mod.UUID,
        generation: int,
        lsn: int | None = None,
        contents: Contents | None = None,
    ) -> Manifest:
        """Write ``contents`` (default: the current state) as a checkpoint into ``directory``."""
        contents = self._c if contents is None else contents
        created = self._manifest.created if directory == self.path else disk.now()
        return disk.write_checkpoint(
            directory, contents, db_uuid, generation, contents.lsn if lsn is None else lsn, created
        )


_CONSTRUCT = object()


@dataclass(frozen=True)
class EntryRecord:
    """One stored entry and where it came from: its id, class, the ``source`` given to
    :meth:`Database.add` (None where none was), its index in that call (``mask``) and the time it
    was added (seconds since the epoch; None for entries stored before provenance was kept)."""

    id: int
    class_name: str
    source: str | None
    mask: int | None
    time: float | None


def _provenance_meta(sources: str | Sequence[str | None] | None, n: int) -> dict[str, Any]:
    """The ``provenance`` of an add record: the source names, each entry's index among them (-1:
    none; left out where one name covers all), and the time."""
    now = time.time()
    if sources is None or isinstance(sources, str):
        names = [] if sources is None else [sources]
        for name in names:
            _check_source(name)
        return {"sources": names, "time": now}
    given = list(sources)
    if len(given) != n:
        raise InvalidInputError(f"{len(given)} sources for {n} embeddings: give one per entry, or one for all")
    names = list(dict.fromkeys(s for s in given if s is not None))
    for name in names:
        _check_source(name)
    index = {name: i for i, name in enumerate(names)}
    return {"sources": names, "of": [-1 if s is None else index[s] for s in given], "time": now}


MAX_SOURCE_CHARS = 1024


def _add_runs(ids: np.ndarray, times: np.ndarray, batch: int) -> list[np.ndarray]:
    """Positions grouped into add records that keep the entries' ids and times: runs of
    consecutive ids added at one time, at most ``batch`` long."""
    same_time = (times[1:] == times[:-1]) | (np.isnan(times[1:]) & np.isnan(times[:-1]))
    breaks = np.flatnonzero((np.diff(ids) != 1) | ~same_time) + 1
    runs = np.split(np.arange(len(ids)), breaks) if len(ids) else []
    return [run[i : i + batch] for run in runs for i in range(0, len(run), batch)]


def _check_source(name: object) -> None:
    if not isinstance(name, str) or not name or len(name) > MAX_SOURCE_CHARS:
        raise InvalidInputError(f"a source is a non-empty string of at most {MAX_SOURCE_CHARS} characters: {name!r}")
