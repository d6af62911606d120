"""knnclip.engine.Database: (embedding, class) pairs in FAISS, grown one class at a time, durably.

Directory layout::

    manifest.json           format, dim, metric, index spec, vocabulary, checkpoint lsn, file hashes
    index.<generation>.faiss   the FAISS index at the last checkpoint (absent until an index is trained)
    entries.<generation>.npy   int64 [n, 2]: entry id and class id of every stored vector, index order
    wal.log                 changes since the checkpoint (see wal.py)
    LOCK                    held by the one writer

A change is validated, appended to the log and fsynced, and only then applied in memory: when
``add`` returns, the batch survives a crash; a batch whose record is cut short is dropped whole on
the next open. ``checkpoint()`` writes new index and entries files under a new generation number,
then the manifest (the switch-over point), then an empty log, then deletes the old generation.
A crash at any step leaves either the old or the new checkpoint complete, and log records already
in a checkpoint are skipped on replay by their sequence numbers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import logging
import os
import shutil
import threading
import uuid as uuid_mod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import faiss
import numpy as np

from knnclip.engine.database import flat_scan
from knnclip.engine.database.indexes import (
    IndexSpec,
    build_index,
    faiss_metric,
    remove_entries,
    search_parameters,
)
from knnclip.engine.database.lock import WriterLock
from knnclip.engine.database.manifest import MANIFEST_NAME, FileRecord, Manifest
from knnclip.engine.database.vocabulary import ClassInfo, Vocabulary
from knnclip.engine.database.wal import HEADER_BYTES, LogWriter, Record, RecordKind, create_log, encode_record, read_log
from knnclip.engine.errors import (
    DatabaseCorruptError,
    DatabaseExistsError,
    DatabaseNotTrainedError,
    InvalidInputError,
    ReadOnlyDatabaseError,
    UnknownClassError,
)
from knnclip.engine.fsutil import atomic_path, atomic_write_bytes, fsync_dir, sha256_file

log = logging.getLogger(__name__)

WAL_NAME = "wal.log"
_MAX_K = 1 << 16
_READER_RETRIES = 5


class SearchResult(NamedTuple):
    """``sims[M, k]`` float32 (-inf where no neighbour), ``labels[M, k]`` and ``ids[M, k]`` int64 (-1 there)."""

    sims: np.ndarray
    labels: np.ndarray
    ids: np.ndarray


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
        self._read_only = read_only
        self._closed = False
        self._mutex = threading.RLock()
        self._spec = manifest.index
        self._dim = manifest.dim
        self._metric = manifest.metric
        self._vocab = manifest.vocabulary.copy()
        self._index: faiss.Index | None = None
        self._ids = np.zeros(0, np.int64)
        self._labels = np.zeros(0, np.int64)
        self._counts: dict[int, int] = {}
        self._next_id = manifest.next_entry_id
        self._lsn = manifest.checkpoint_lsn
        self._lock: WriterLock | None = None
        self._log: LogWriter | None = None
        self._log_valid_end = HEADER_BYTES  # set by _replay: where the writer appends
        self._gpu: Any = None
        #: A log larger than this triggers a checkpoint after the change that grew it.
        self.auto_checkpoint_bytes = 256 << 20

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
        db = cls(_CONSTRUCT, target, _empty_manifest(int(dim), metric, spec), read_only=True)
        if not spec.needs_training:
            db._index = build_index(spec, db._dim, metric)
        db._write_directory(target, db._manifest.uuid, generation=1)
        db._closed = True
        return cls.open(target)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, device: str = "cpu", read_only: bool = False) -> Database:
        """Open a database: verify every file, replay the log, and take the writer lock unless ``read_only``.

        Raises DatabaseCorruptError (naming the file) on a damaged, truncated or foreign file,
        DatabaseLockedError when another writer has it open. Read-only opens share the database
        with one writer and see the state at the moment they open.
        """
        directory = Path(path)
        if device not in ("cpu", "cuda"):
            raise InvalidInputError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: no such database directory (create it with Database.create)")
        lock = None if read_only else WriterLock(directory)
        try:
            db = cls._load(directory, read_only, retry=read_only)
            db._lock = lock
            if not read_only:
                db._log = LogWriter(directory / WAL_NAME, db._log_valid_end)
                db._remove_stale_files()
            if device == "cuda":
                from knnclip.engine.database.gpu import GpuMirror

                db._gpu = GpuMirror(db._spec, db._dim, db._index)
            return db
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    @classmethod
    def _load(cls, directory: Path, read_only: bool, retry: bool) -> Database:
        for attempt in range(_READER_RETRIES if retry else 1):
            before = _read_or_none(directory / MANIFEST_NAME)
            try:
                manifest = Manifest.read(directory)
                db = cls(_CONSTRUCT, directory, manifest, read_only)
                db._load_checkpoint()
                db._replay()
                return db
            except (DatabaseCorruptError, FileNotFoundError):
                # A reader may race a writer's checkpoint (files replaced under it): if the manifest
                # changed meanwhile, read again; if not, the damage is real.
                if (
                    attempt + 1 < (_READER_RETRIES if retry else 1)
                    and _read_or_none(directory / MANIFEST_NAME) != before
                ):
                    continue
                raise
        raise AssertionError("unreachable")

    def _load_checkpoint(self) -> None:
        m = self._manifest
        entries_rec = m.files.get("entries")
        if entries_rec is None:
            raise DatabaseCorruptError(self.path / MANIFEST_NAME, "lists no entries file")
        entries_path = self._verified(entries_rec)
        try:
            entries = np.load(entries_path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DatabaseCorruptError(entries_path, f"unreadable entries file ({exc})") from None
        if entries.dtype != np.int64 or entries.ndim != 2 or entries.shape != (m.entries, 2):
            raise DatabaseCorruptError(
                entries_path, f"entries have shape {entries.shape} {entries.dtype}, expected ({m.entries}, 2) int64"
            )
        self._ids = entries[:, 0].copy()
        self._labels = entries[:, 1].copy()
        if len(self._ids) and (np.any(np.diff(self._ids) <= 0) or self._ids[-1] >= m.next_entry_id):
            raise DatabaseCorruptError(entries_path, "entry ids are not increasing")
        unknown = set(np.unique(self._labels).tolist()) - set(self._vocab)
        if unknown:
            raise DatabaseCorruptError(
                entries_path, f"entries of classes {sorted(unknown)} missing from the vocabulary"
            )
        self._counts = dict(zip(*(a.tolist() for a in np.unique(self._labels, return_counts=True)), strict=True))

        index_rec = m.files.get("index")
        if index_rec is None:
            if not (self._spec.needs_training and not m.trained and m.entries == 0):
                raise DatabaseCorruptError(self.path / MANIFEST_NAME, "lists no index file")
            return
        index_path = self._verified(index_rec)
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as exc:
            raise DatabaseCorruptError(index_path, f"FAISS cannot read the index ({exc})") from None
        if index.d != m.dim or index.ntotal != m.entries:
            raise DatabaseCorruptError(
                index_path, f"index holds {index.ntotal} vectors of dim {index.d}, manifest says {m.entries} of {m.dim}"
            )
        self._index = index

    def _verified(self, rec: FileRecord) -> Path:
        path = self.path / rec.name
        if not path.is_file():
            raise DatabaseCorruptError(path, "missing (listed in manifest.json)")
        size = path.stat().st_size
        if size != rec.bytes:
            raise DatabaseCorruptError(path, f"{size} bytes, manifest.json says {rec.bytes} (truncated or replaced)")
        if sha256_file(path) != rec.sha256:
            raise DatabaseCorruptError(path, "SHA-256 does not match manifest.json (the file is damaged)")
        return path

    def _replay(self) -> None:
        wal_path = self.path / WAL_NAME
        contents = read_log(wal_path, self._manifest.uuid)
        checkpoint = self._manifest.checkpoint_lsn
        last = contents.records[-1].lsn if contents.records else contents.base_lsn
        if contents.base_lsn > checkpoint or last < checkpoint:
            raise DatabaseCorruptError(
                wal_path, f"log covers sequence numbers {contents.base_lsn}..{last}, the checkpoint is at {checkpoint}"
            )
        for record in contents.records:
            if record.lsn > checkpoint:
                try:
                    self._apply(record)
                except (KeyError, ValueError, TypeError, UnknownClassError) as exc:
                    raise DatabaseCorruptError(wal_path, f"record {record.lsn} cannot be applied ({exc})") from None
        if contents.torn_bytes:
            log.warning("%s: dropped a torn record of %d bytes at the end of the log", wal_path, contents.torn_bytes)
        self._log_valid_end = contents.valid_end

    def _remove_stale_files(self) -> None:
        """Delete what an interrupted checkpoint left behind (the writer alone calls this)."""
        keep = {f.name for f in self._manifest.files.values()}
        for p in self.path.iterdir():
            stale_tmp = p.name.startswith(".") and p.name.endswith(".tmp")
            old_generation = p.suffix in (".faiss", ".npy") and p.name.split(".")[0] in ("index", "entries")
            if stale_tmp or (old_generation and p.name not in keep):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    # Read-only views -------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def metric(self) -> str:
        return self._metric

    @property
    def index_spec(self) -> IndexSpec:
        return self._spec

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def is_trained(self) -> bool:
        return self._index is not None and bool(self._index.is_trained)

    @property
    def vocabulary(self) -> Vocabulary:
        """A copy of the vocabulary: class id -> ClassInfo (name, synonyms); ``find(name)`` looks up."""
        with self._mutex:
            return self._vocab.copy()

    @property
    def classes(self) -> dict[str, int]:
        """Class name -> number of entries, for every class in the vocabulary (in id order)."""
        with self._mutex:
            return {info.name: self._counts.get(cid, 0) for cid, info in sorted(self._vocab.items())}

    def __len__(self) -> int:
        return len(self._ids)

    def entries(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of (entry ids, class ids) of every stored vector, in index order."""
        with self._mutex:
            return self._ids.copy(), self._labels.copy()

    def vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored (decoded) vectors of entry ``ids``, float32 [n, dim]. flat and hnsw indexes only."""
        with self._mutex:
            self._check_open()
            if not self._spec.positional:
                raise InvalidInputError(f"vectors() is not available for {self._spec.kind} indexes")
            want = np.asarray(ids, dtype=np.int64).reshape(-1)
            pos = np.searchsorted(self._ids, want)
            found = pos < len(self._ids)
            found[found] = self._ids[pos[found]] == want[found]
            if not found.all():
                raise InvalidInputError(f"no entries with ids {want[~found][:10].tolist()} in {self.path}")
            out = np.empty((len(pos), self._dim), np.float32)
            for row, p in enumerate(pos.tolist()):
                out[row] = self._index.reconstruct(int(p))
            return out

    def __repr__(self) -> str:
        mode = "closed" if self._closed else ("read-only" if self._read_only else "writer")
        return (
            f"Database({str(self.path)!r}, {len(self._ids)} entries, {len(self._vocab)} classes, "
            f"{self._spec.kind}/{self._spec.storage}, dim={self._dim}, {mode})"
        )

    # Changes ---------------------------------------------------------------------------------
    def add(self, embeddings: np.ndarray, labels: Sequence[str] | np.ndarray) -> np.ndarray:
        """Store ``embeddings[N, D]`` with their class ``labels``; return their new entry ids (int64 [N]).

        Labels are class names (a new name creates a class; ``"wall,walls"`` gives synonyms) or
        existing class ids. Nothing already stored changes. Durable when this returns.
        """
        with self._mutex:
            self._check_writable()
            vectors = self._validated_vectors(embeddings, "embeddings")
            n = len(vectors)
            class_ids, changed = self._resolve_labels(labels, n)
            if n == 0:
                return np.zeros(0, np.int64)
            if not self.is_trained:
                raise DatabaseNotTrainedError(
                    f"{self.path}: the {self._spec.kind}/{self._spec.storage} index must be trained first: "
                    f"db.train(samples) with at least {self._spec.min_training_points()} representative vectors"
                )
            meta = {"first_id": self._next_id, "n": n, "dim": self._dim, "classes": [c.to_json() for c in changed]}
            self._commit(RecordKind.ADD, meta, class_ids.tobytes(), vectors.tobytes())
            return np.arange(meta["first_id"], meta["first_id"] + n, dtype=np.int64)

    def add_class(self, name: str, synonyms: Sequence[str] = (), *, thing: bool | None = None) -> ClassInfo:
        """Register a class (or add synonyms to an existing one, or set whether it is a ``thing``)
        without entries; return it."""
        with self._mutex:
            self._check_writable()
            info = self._vocab.plan(name, tuple(synonyms), thing)
            if self._vocab.get(info.id) != info:
                self._commit(RecordKind.PUT_CLASS, {"class": info.to_json()})
            return info

    def remove_class(self, name: str | int) -> int:
        """Delete a class and every entry of it; return how many entries went. Other classes are untouched."""
        with self._mutex:
            self._check_writable()
            info = self._vocab[name] if isinstance(name, int | np.integer) else self._vocab.get_by_name(name)
            removed = self._counts.get(info.id, 0)
            self._commit(RecordKind.REMOVE_CLASS, {"class_id": info.id})
            return removed

    def train(self, samples: np.ndarray) -> None:
        """Train the index (IVF centroids, PQ codebooks, sq8 ranges) on representative vectors.

        Only while the database is empty. Use vectors like the ones you will add (e.g. a sample of
        the dataset's mask embeddings); the result is checkpointed before this returns.
        """
        with self._mutex:
            self._check_writable()
            if len(self._ids):
                raise InvalidInputError(f"{self.path}: train() needs an empty database ({len(self._ids)} entries)")
            x = self._validated_vectors(samples, "samples")
            need = self._spec.min_training_points()
            if len(x) < need:
                raise InvalidInputError(
                    f"training a {self._spec.kind}/{self._spec.storage} index needs >= {need} vectors"
                )
            spec = self._spec.resolved_for(len(x), self._dim)
            index = build_index(spec, self._dim, self._metric)
            index.train(x)
            self._spec, self._index = spec, index
            self.checkpoint()
            if self._gpu is not None:
                self._gpu.rebuild(self._index)

    def checkpoint(self) -> None:
        """Write the index and entries atomically under a new generation and empty the log."""
        with self._mutex:
            self._check_writable()
            old = set(f.name for f in self._manifest.files.values())
            self._manifest = self._write_directory(self.path, self._manifest.uuid, self._manifest.generation + 1)
            create_log(self.path / WAL_NAME, self._manifest.uuid, self._lsn)
            self._log.close()
            self._log = LogWriter(self.path / WAL_NAME, HEADER_BYTES)
            for name in old - {f.name for f in self._manifest.files.values()}:
                with contextlib.suppress(FileNotFoundError):
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
            if self._closed:
                return
            try:
                if self._log is not None and self._log.size > HEADER_BYTES and checkpoint is not False:
                    index_rec = self._manifest.files.get("index")
                    if checkpoint or index_rec is None or self._log.size * 4 >= index_rec.bytes:
                        self.checkpoint()
            finally:
                self._closed = True
                if self._log is not None:
                    self._log.close()
                if self._lock is not None:
                    self._lock.release()
                self._index = self._gpu = None

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Search ----------------------------------------------------------------------------------
    def search(
        self, queries: np.ndarray, k: int, *, nprobe: int | None = None, ef_search: int | None = None
    ) -> SearchResult:
        """The ``k`` most similar entries of each query: ``(sims, labels, ids)``, each [M, k], best first.

        Where fewer than k entries exist (or a cosine query is all zeros, e.g. an empty mask),
        labels and ids are -1 and sims -inf. ``nprobe``/``ef_search`` override the index's defaults.
        """
        if not isinstance(k, int | np.integer) or isinstance(k, bool) or not 1 <= k <= _MAX_K:
            raise InvalidInputError(f"k must be an integer in [1, {_MAX_K}], got {k!r}")
        q = self._validated_vectors(queries, "queries", allow_zero=True)
        m = len(q)
        sims = np.full((m, k), -np.inf, np.float32)
        labels = np.full((m, k), -1, np.int64)
        ids = np.full((m, k), -1, np.int64)
        with self._mutex:
            self._check_open()
            if m == 0 or len(self._ids) == 0:
                return SearchResult(sims, labels, ids)
            params = search_parameters(self._spec, nprobe, ef_search)
            # A cosine query of zeros (an empty mask) has no direction and no neighbours: it is
            # not searched at all (FC-CLIP leaves many of its queries empty).
            searched = np.any(q != 0, axis=1) if self._metric == "cosine" else np.ones(m, bool)
            found_sims = np.full((m, k), -np.inf, np.float32)
            found = np.full((m, k), -1, np.int64)
            if searched.any():
                sub = q if searched.all() else np.ascontiguousarray(q[searched])
                if self._gpu is not None:
                    found_sims[searched], found[searched] = self._gpu.search(sub, k, params)
                elif self._spec.kind == "flat" and self._spec.storage in ("fp16", "sq8"):
                    found_sims[searched], found[searched] = flat_scan.scan(self._index, self._spec.storage, sub, k)
                else:
                    found_sims[searched], found[searched] = self._index.search(sub, k, params=params)
            hit = found >= 0
            pos = found[hit] if self._spec.positional else np.searchsorted(self._ids, found[hit])
            sims[hit] = found_sims[hit]
            labels[hit] = self._labels[pos]
            ids[hit] = self._ids[pos]
        return SearchResult(sims, labels, ids)

    # Statistics ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Entries, classes, index type and parameters, bytes per entry (codes and on disk), log size."""
        with self._mutex:
            files = [self.path / f.name for f in self._manifest.files.values()] + [self.path / WAL_NAME]
            disk = sum(p.stat().st_size for p in files if p.exists())
            n = len(self._ids)
            return {
                "path": str(self.path),
                "entries": n,
                "classes": len(self._vocab),
                "dim": self._dim,
                "metric": self._metric,
                "index": self._spec.kind,
                "storage": self._spec.storage,
                "params": dict(self._spec.params),
                "trained": self.is_trained,
                "code_bytes_per_entry": self._spec.code_bytes(self._dim),
                "disk_bytes": disk,
                "disk_bytes_per_entry": disk / n if n else None,
                "log_bytes": self._log.size if self._log is not None else (self.path / WAL_NAME).stat().st_size,
                "lsn": self._lsn,
                "checkpoint_lsn": self._manifest.checkpoint_lsn,
                "device": "cuda" if self._gpu is not None else "cpu",
                "read_only": self._read_only,
                "uuid": str(self._manifest.uuid),
            }

    # Internals -------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ReadOnlyDatabaseError(f"{self.path}: the database is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._read_only:
            raise ReadOnlyDatabaseError(f"{self.path}: opened read_only=True; open it without read_only to change it")

    def _validated_vectors(self, x: Any, what: str, allow_zero: bool = False) -> np.ndarray:
        arr = np.asarray(x)
        if arr.dtype.kind != "f":
            raise InvalidInputError(f"{what} must be a float array (float16/32/64), got dtype {arr.dtype}")
        if arr.ndim != 2 or arr.shape[1] != self._dim:
            raise InvalidInputError(f"{what} must have shape [N, {self._dim}], got {list(arr.shape)}")
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes Inf, reported below
            arr = np.ascontiguousarray(arr, dtype=np.float32)
        finite = np.isfinite(arr).all(axis=1)
        if not finite.all():
            rows = np.flatnonzero(~finite)[:5].tolist()
            raise InvalidInputError(f"{what} rows {rows} contain NaN or Inf (or overflow float32)")
        if self._metric == "cosine":
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
            unknown = sorted(set(np.unique(arr).tolist()) - set(self._vocab))
            if unknown:
                raise UnknownClassError(f"class ids {unknown[:10]} are not in the vocabulary; add them by name")
            return arr.astype(np.int64), []
        if arr.dtype.kind not in "UO" or not all(isinstance(v, str) for v in arr.tolist()):
            raise InvalidInputError(f"labels must be class names (str) or class ids (int), got dtype {arr.dtype}")
        scratch = self._vocab.copy()
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
        record_bytes = encode_record(self._lsn + 1, kind, meta, *body)
        self._log.append(record_bytes)
        try:
            self._apply(Record(self._lsn + 1, kind, meta, memoryview(b"".join(body))))
        except BaseException:
            # The log has the change but memory does not: refuse further use rather than diverge.
            self._read_only = True
            raise
        if self._log.size > self.auto_checkpoint_bytes:
            self.checkpoint()

    def _apply(self, record: Record) -> None:
        meta = record.meta
        if record.kind == RecordKind.ADD:
            n, dim, first = int(meta["n"]), int(meta["dim"]), int(meta["first_id"])
            if dim != self._dim or len(record.body) != n * 8 + n * dim * 4 or first < self._next_id:
                raise ValueError(f"add record of {n}x{dim} with first id {first} does not fit this database")
            class_ids = np.frombuffer(record.body, np.int64, n)
            vectors = np.frombuffer(record.body, np.float32, n * dim, offset=n * 8).reshape(n, dim)
            for c in meta["classes"]:
                self._vocab.put(ClassInfo.from_json(c))
            if not set(np.unique(class_ids).tolist()) <= set(self._vocab):
                raise ValueError("add record refers to unknown classes")
            if self._index is None or not self._index.is_trained:
                raise ValueError("add record before the index was trained")
            new_ids = np.arange(first, first + n, dtype=np.int64)
            if self._spec.positional:
                self._index.add(vectors)
            else:
                self._index.add_with_ids(vectors, new_ids)
            if self._gpu is not None:
                self._gpu.add(vectors, new_ids)
            self._ids = np.concatenate([self._ids, new_ids])
            self._labels = np.concatenate([self._labels, class_ids])
            for cid, count in zip(*np.unique(class_ids, return_counts=True), strict=True):
                self._counts[int(cid)] = self._counts.get(int(cid), 0) + int(count)
            self._next_id = first + n
        elif record.kind == RecordKind.REMOVE_CLASS:
            class_id = int(meta["class_id"])
            self._vocab.remove(class_id)
            keep = self._labels != class_id
            if not keep.all():
                self._index = remove_entries(self._index, self._spec, keep, self._ids)
                self._ids, self._labels = self._ids[keep], self._labels[keep]
                if self._gpu is not None:
                    self._gpu.rebuild(self._index)
            self._counts.pop(class_id, None)
        elif record.kind == RecordKind.PUT_CLASS:
            self._vocab.put(ClassInfo.from_json(meta["class"]))
        self._lsn = record.lsn

    def _write_directory(
        self, directory: Path, db_uuid: uuid_mod.UUID, generation: int, lsn: int | None = None
    ) -> Manifest:
        """Write the current state as a checkpoint into ``directory``.

        An existing directory (checkpoint) gets new generation files and then the manifest; a new
        one (create, snapshot) is assembled under a temporary name and renamed into place whole.
        """
        lsn = self._lsn if lsn is None else lsn
        fresh = not directory.exists()
        workdir = directory.with_name(f".{directory.name}.{os.getpid()}.tmp") if fresh else directory
        if fresh:
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir(parents=True)
        try:
            files: dict[str, FileRecord] = {}
            if self._index is not None:
                name = f"index.{generation:06d}.faiss"
                with atomic_path(workdir / name) as tmp:
                    faiss.write_index(self._index, str(tmp))
                files["index"] = FileRecord(name, (workdir / name).stat().st_size, sha256_file(workdir / name))
            buf = io.BytesIO()
            np.save(buf, np.stack([self._ids, self._labels], axis=1).astype(np.int64), allow_pickle=False)
            name = f"entries.{generation:06d}.npy"
            atomic_write_bytes(workdir / name, buf.getbuffer())
            files["entries"] = FileRecord(name, buf.getbuffer().nbytes, hashlib.sha256(buf.getbuffer()).hexdigest())
            manifest = Manifest(
                uuid=db_uuid,
                dim=self._dim,
                metric=self._metric,
                index=self._spec,
                trained=self.is_trained,
                vocabulary=self._vocab.copy(),
                entries=len(self._ids),
                next_entry_id=self._next_id,
                checkpoint_lsn=lsn,
                generation=generation,
                files=files,
                created=self._manifest.created if directory == self.path else _now(),
                extra={"updated": _now(), "faiss_version": faiss.__version__, "counts": self.classes},
            )
            if fresh:
                create_log(workdir / WAL_NAME, db_uuid, lsn)
            manifest.write(workdir)
            if fresh:
                os.rename(workdir, directory)
                fsync_dir(directory.parent)
        except BaseException:
            if fresh:
                shutil.rmtree(workdir, ignore_errors=True)
            raise
        return manifest


_CONSTRUCT = object()


def _empty_manifest(dim: int, metric: str, spec: IndexSpec) -> Manifest:
    return Manifest(
        uuid=uuid_mod.uuid4(),
        dim=dim,
        metric=metric,
        index=spec,
        trained=False,
        vocabulary=Vocabulary(),
        entries=0,
        next_entry_id=0,
        checkpoint_lsn=0,
        generation=0,
        files={},
        created=_now(),
    )


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None
