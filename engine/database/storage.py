"""The on-disk format of a database directory: reading a checkpoint into :class:`Contents`,
replaying the write-ahead log over it, and writing a checkpoint.

Directory layout::

    manifest.json              format, dim, metric, index spec, vocabulary, checkpoint lsn, file hashes
    index.<generation>.faiss   the FAISS index at the last checkpoint (absent until an index is trained)
    entries.<generation>.npy   int64 [n, 2]: entry id and class id of every stored vector, index order
    provenance.<generation>.npz  where each entry came from, in the same order (source, its index in
                               its add call, the time); databases from before it have none, and
                               their first checkpoint writes it
    store.<generation>.npy     ivf-rabitq only: a segment of the re-rank store (rows added up to
                               that checkpoint; older segments stay while their rows are live)
    store-ranges.<generation>.npy  ivf-rabitq with sq8 only: the store's per-dimension ranges
    wal.log                    changes since the checkpoint (see wal.py)
    LOCK                       held by the one writer

A checkpoint writes new index and entries files under a new generation number, then the manifest
(the switch-over point), then an empty log, then deletes the old generation. A crash at any step
leaves either the old or the new checkpoint complete, and log records already in a checkpoint are
skipped on replay by their sequence numbers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import logging
import os
import shutil
import tempfile
import uuid as uuid_mod
import zipfile
from pathlib import Path

import faiss
import numpy as np

from knnclip.engine.database.contents import Contents, Provenance
from knnclip.engine.database.indexes import IndexSpec
from knnclip.engine.database.manifest import MANIFEST_NAME, FileRecord, Manifest
from knnclip.engine.database.rerank_store import RerankStore
from knnclip.engine.database.vocabulary import Vocabulary
from knnclip.engine.database.wal import LogContents, create_log, read_log
from knnclip.engine.errors import DatabaseCorruptError, DatabaseExistsError
from knnclip.engine.fsutil import atomic_path, atomic_write_bytes, fsync_dir, sha256_file

log = logging.getLogger("knnclip.engine.database")

WAL_NAME = "wal.log"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def empty_manifest(dim: int, metric: str, spec: IndexSpec) -> Manifest:
    """The manifest of a new, empty database."""
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
        created=now(),
    )


def read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def verified_file(directory: Path, rec: FileRecord) -> Path:
    """The path of a file the manifest lists, once its size and SHA-256 match. A symlink is refused:
    every file of a database is a plain file inside its directory."""
    path = directory / rec.name
    if path.is_symlink():
        raise DatabaseCorruptError(path, "is a symlink; a database's files are plain files in its directory")
    if not path.is_file():
        raise DatabaseCorruptError(path, "missing (listed in manifest.json)")
    size = path.stat().st_size
    if size != rec.bytes:
        raise DatabaseCorruptError(path, f"{size} bytes, manifest.json says {rec.bytes} (truncated or replaced)")
    if sha256_file(path) != rec.sha256:
        raise DatabaseCorruptError(path, "SHA-256 does not match manifest.json (the file is damaged)")
    return path


def load_checkpoint(directory: Path, manifest: Manifest) -> Contents:
    """The contents at the manifest's checkpoint, every file verified."""
    m = manifest
    contents = Contents(m)
    entries_rec = m.files.get("entries")
    if entries_rec is None:
        raise DatabaseCorruptError(directory / MANIFEST_NAME, "lists no entries file")
    entries_path = verified_file(directory, entries_rec)
    try:
        entries = np.load(entries_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DatabaseCorruptError(entries_path, f"unreadable entries file ({exc})") from None
    if entries.dtype != np.int64 or entries.ndim != 2 or entries.shape != (m.entries, 2):
        raise DatabaseCorruptError(
            entries_path, f"entries have shape {entries.shape} {entries.dtype}, expected ({m.entries}, 2) int64"
        )
    ids, labels = entries[:, 0].copy(), entries[:, 1].copy()
    if len(ids) and (np.any(np.diff(ids) <= 0) or ids[-1] >= m.next_entry_id):
        raise DatabaseCorruptError(entries_path, "entry ids are not increasing")
    unknown = set(np.unique(labels).tolist()) - set(contents.vocab)
    if unknown:
        raise DatabaseCorruptError(entries_path, f"entries of classes {sorted(unknown)} missing from the vocabulary")
    prov_rec = m.files.get("provenance")
    if prov_rec is None:  # a database from before provenance was kept
        contents.set_entries(ids, labels)
    else:
        contents.set_entries(ids, labels, read_provenance(verified_file(directory, prov_rec), len(ids)))

    index_rec = m.files.get("index")
    if index_rec is None:
        if not (contents.spec.needs_training and not m.trained and m.entries == 0):
            raise DatabaseCorruptError(directory / MANIFEST_NAME, "lists no index file")
        return contents
    index_path = verified_file(directory, index_rec)
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as exc:
        raise DatabaseCorruptError(index_path, f"FAISS cannot read the index ({exc})") from None
    if index.d != m.dim or index.ntotal != m.entries:
        raise DatabaseCorruptError(
            index_path, f"index holds {index.ntotal} vectors of dim {index.d}, manifest says {m.entries} of {m.dim}"
        )
    contents.index = index
    if contents.spec.rerank_store:
        contents.store = load_store(directory, m, contents.spec.storage, m.dim, str(contents.spec.params["store"]))
    return contents


def store_segment_records(manifest: Manifest) -> list[FileRecord]:
    """The manifest's re-rank store segments, in row order."""
    keys = sorted((k for k in manifest.files if k.startswith("store-") and k[6:].isdigit()), key=lambda k: int(k[6:]))
    return [manifest.files[k] for k in keys]


def load_store(directory: Path, manifest: Manifest, precision: str, dim: int, place: str) -> RerankStore:
    """The re-rank store of a checkpoint, each file verified; its segments memory-mapped when
    ``place`` is "disk", read into memory when "ram"."""
    ranges = None
    if precision == "sq8":
        rec = manifest.files.get("store-ranges")
        if rec is None:
            raise DatabaseCorruptError(directory / MANIFEST_NAME, "lists no store-ranges file for its sq8 store")
        ranges = _read_array(verified_file(directory, rec), np.float32, (2, dim), "store ranges")
    store = RerankStore(precision, dim, ranges)
    records = store_segment_records(manifest)
    segments = open_segments(directory, records, store.dtype, dim, place, {})
    rows = sum(len(s) for s in segments)
    if rows != manifest.entries:
        raise DatabaseCorruptError(directory / MANIFEST_NAME, f"store holds {rows} rows for {manifest.entries} entries")
    store.checkpointed(segments, records)
    return store


def open_segments(
    directory: Path,
    records: list[FileRecord],
    dtype: type[np.generic],
    dim: int,
    place: str,
    already: dict[str, np.ndarray],
) -> list[np.ndarray]:
    """The store segments of ``records``: those in ``already`` (by file name) as they are, the
    others verified and memory-mapped or read."""
    out = []
    for rec in records:
        if rec.name in already:
            out.append(already[rec.name])
            continue
        path = verified_file(directory, rec)
        out.append(_read_array(path, dtype, (None, dim), "store segment", mmap=place == "disk"))
    return out


def _read_array(
    path: Path, dtype: type[np.generic], shape: tuple[int | None, int], what: str, mmap: bool = False
) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as exc:
        raise DatabaseCorruptError(path, f"unreadable {what} ({exc})") from None
    fits = arr.ndim == len(shape) and all(w is None or w == a for w, a in zip(shape, arr.shape, strict=True))
    if arr.dtype != dtype or not fits:
        raise DatabaseCorruptError(path, f"{what} is {arr.dtype} {arr.shape}, expected {np.dtype(dtype)} {shape}")
    return arr


def write_store(workdir: Path, store: RerankStore, generation: int, compact: bool) -> dict[str, FileRecord]:
    """Write the re-rank store's new files under ``generation``: its ranges, and either every
    live row as one segment (``compact``: a new directory, or rows left behind by removals) or the
    rows added since the last checkpoint as one more segment beside the kept ones.

    Segments merge like a binary counter: the new rows take the newest kept segments with them
    while those are at most twice their size, so a store of n rows has about log2(n / rows per
    checkpoint) segments and each row is rewritten about that many times, not once per checkpoint.
    """
    files: dict[str, FileRecord] = {}
    if store.ranges is not None:
        name = f"store-ranges.{generation:06d}.npy"
        files["store-ranges"] = _write_npy(workdir / name, [store.ranges], store.ranges.dtype)
    name = f"store.{generation:06d}.npy"
    if compact:
        blocks = store.live_rows()
        segments = [_write_npy(workdir / name, blocks, np.dtype(store.dtype))] if len(store) else []
    else:
        kept = [(r, s) for r, s in zip(store.segment_records, store.segments, strict=True) if isinstance(r, FileRecord)]
        tail = [store.pending_rows()]
        while len(tail[0]) and kept and len(kept[-1][1]) <= 2 * sum(len(t) for t in tail):
            tail.insert(0, kept.pop()[1])
        segments = [r for r, _ in kept]
        if sum(len(t) for t in tail):
            segments.append(_write_npy(workdir / name, tail, np.dtype(store.dtype)))
    files.update({f"store-{i}": rec for i, rec in enumerate(segments)})
    return files


def _write_npy(path: Path, blocks: list[np.ndarray], dtype: np.dtype) -> FileRecord:
    """``blocks`` stacked into one .npy file, written atomically without holding the whole."""
    rows = sum(len(b) for b in blocks)
    shape = (rows, *blocks[0].shape[1:])
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        start = 0
        for b in blocks:
            out[start : start + len(b)] = b
            start += len(b)
        out.flush()
        del out
    return FileRecord(path.name, path.stat().st_size, sha256_file(path))


def reopen_store(directory: Path, manifest: Manifest, store: RerankStore, place: str) -> None:
    """After a checkpoint of this directory: the store reads its rows from the segments just
    written (memory-mapped when ``place`` is "disk"), keeping the segments it had."""
    records = store_segment_records(manifest)
    kept = {getattr(rec, "name", ""): seg for rec, seg in zip(store.segment_records, store.segments, strict=True)}
    new = [r for r in records if r.name not in kept]
    merged = len(records) - len(new) < len(kept)  # some kept segments went into the new one
    if place == "ram" and len(new) == 1 and not merged and not store.needs_compaction:
        kept[new[0].name] = store.pending_rows()  # what was just written is what memory holds: not read back
    store.checkpointed(open_segments(directory, records, store.dtype, store.dim, place, kept), records)


def provenance_bytes(p: Provenance) -> bytes:
    """The provenance file: the source of each entry (an index into the names), its index in its
    add call, the time it was added, and the source names as UTF-8 with their offsets."""
    encoded = [name.encode() for name in p.names]
    offsets = np.cumsum([0, *(len(e) for e in encoded)]).astype(np.int64)
    buf = io.BytesIO()
    np.savez(
        buf,
        source=p.source,
        mask=p.mask,
        time=p.time,
        names=np.frombuffer(b"".join(encoded), np.uint8),
        offsets=offsets,
    )
    return buf.getvalue()


def read_provenance(path: Path, n: int) -> Provenance:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in ("source", "mask", "time", "names", "offsets")}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise DatabaseCorruptError(path, f"unreadable provenance file ({type(exc).__name__}: {exc})") from None
    expected = {"source": np.int32, "mask": np.int32, "time": np.float64}
    for key, dtype in expected.items():
        if arrays[key].dtype != dtype or arrays[key].shape != (n,):
            raise DatabaseCorruptError(
                path, f"provenance {key!r} is {arrays[key].dtype} {arrays[key].shape}, expected ({n},)"
            )
    offsets, blob = arrays["offsets"], arrays["names"].tobytes()
    if (
        offsets.ndim != 1
        or not len(offsets)
        or offsets[0] != 0
        or offsets[-1] != len(blob)
        or np.any(np.diff(offsets) < 0)
    ):
        raise DatabaseCorruptError(path, "provenance source names are malformed")
    try:
        names = [blob[a:b].decode() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    except UnicodeDecodeError:
        raise DatabaseCorruptError(path, "provenance source names are not UTF-8") from None
    source = arrays["source"]
    if len(source) and (source.min() < -1 or source.max() >= len(names)):
        raise DatabaseCorruptError(path, "provenance names a source it does not hold")
    return Provenance(names, source, arrays["mask"], arrays["time"])


def replay(directory: Path, manifest: Manifest, contents: Contents) -> LogContents:
    """Apply the log's records after the checkpoint to ``contents``; returns what the log held
    (where its valid records end, which is where a writer appends; the torn tail; its format)."""
    wal_path = directory / WAL_NAME
    log_contents = read_log(wal_path, manifest.uuid)
    checkpoint = manifest.checkpoint_lsn
    last = log_contents.records[-1].lsn if log_contents.records else log_contents.base_lsn
    if log_contents.base_lsn > checkpoint or last < checkpoint:
        raise DatabaseCorruptError(
            wal_path, f"log covers sequence numbers {log_contents.base_lsn}..{last}, the checkpoint is at {checkpoint}"
        )
    contents.apply_all((r for r in log_contents.records if r.lsn > checkpoint), wal_path)
    if log_contents.torn_bytes:
        log.warning(
            "%s: a torn record of %d bytes at byte %d ends the log (a write a crash cut short); a writer "
            "keeps it aside and cuts it",
            wal_path,
            log_contents.torn_bytes,
            log_contents.valid_end,
        )
    log_contents.records = []  # applied; the caller keeps only where the log ends
    return log_contents


def remove_stale_files(directory: Path, manifest: Manifest) -> None:
    """Delete what an interrupted checkpoint left behind (the writer alone calls this)."""
    keep = {f.name for f in manifest.files.values()}
    for p in directory.iterdir():
        stale_tmp = p.name.startswith(".") and p.name.endswith(".tmp")
        prefix = p.name.split(".")[0]
        old_generation = p.suffix in (".faiss", ".npy", ".npz") and prefix in (
            "index",
            "entries",
            "provenance",
            "store",
            "store-ranges",
        )
        if stale_tmp or (old_generation and p.name not in keep):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def generation_files(generation: int) -> tuple[str, ...]:
    """The names of a checkpoint generation's files: index, entries, provenance, and the
    re-rank store's segment and ranges."""
    g = f"{generation:06d}"
    return f"index.{g}.faiss", f"entries.{g}.npy", f"provenance.{g}.npz", f"store.{g}.npy", f"store-ranges.{g}.npy"


def remove_generation(directory: Path, generation: int) -> None:
    """Delete what a failed checkpoint wrote of ``generation`` (the manifest never named it)."""
    for name in generation_files(generation):
        with contextlib.suppress(OSError):
            (directory / name).unlink()


def write_checkpoint(
    directory: Path, contents: Contents, db_uuid: uuid_mod.UUID, generation: int, lsn: int, created: str
) -> Manifest:
    """Write ``contents`` as a checkpoint into ``directory``.

    An existing directory (checkpoint) gets new generation files and then the manifest; a new
    one (create, snapshot) is assembled under a temporary name and renamed into place whole.
    """
    fresh = not directory.exists()
    if fresh:
        directory.parent.mkdir(parents=True, exist_ok=True)
        # an unpredictable name, created exclusively: nothing planted beside it can redirect the writes
        workdir = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    else:
        workdir = directory
    try:
        files: dict[str, FileRecord] = {}
        if contents.index is not None:
            name = generation_files(generation)[0]
            with atomic_path(workdir / name) as tmp:
                faiss.write_index(contents.index, str(tmp))
            files["index"] = FileRecord(name, (workdir / name).stat().st_size, sha256_file(workdir / name))
        buf = io.BytesIO()
        np.save(buf, np.stack([contents.ids, contents.labels], axis=1).astype(np.int64), allow_pickle=False)
        name = generation_files(generation)[1]
        atomic_write_bytes(workdir / name, buf.getbuffer())
        files["entries"] = FileRecord(name, buf.getbuffer().nbytes, hashlib.sha256(buf.getbuffer()).hexdigest())
        name = generation_files(generation)[2]
        data = provenance_bytes(contents.provenance)
        atomic_write_bytes(workdir / name, data)
        files["provenance"] = FileRecord(name, len(data), hashlib.sha256(data).hexdigest())
        if contents.store is not None:
            files.update(
                write_store(workdir, contents.store, generation, compact=fresh or contents.store.needs_compaction)
            )
        manifest = Manifest(
            uuid=db_uuid,
            dim=contents.dim,
            metric=contents.metric,
            index=contents.spec,
            trained=contents.is_trained,
            vocabulary=contents.vocab.copy(),
            entries=len(contents.ids),
            next_entry_id=contents.next_id,
            checkpoint_lsn=lsn,
            generation=generation,
            files=files,
            created=created,
            extra={"updated": now(), "faiss_version": faiss.__version__, "counts": contents.class_counts()},
        )
        if fresh:
            create_log(workdir / WAL_NAME, db_uuid, lsn)
        manifest.write(workdir)
        if fresh:
            try:
                os.rename(workdir, directory)
            except OSError as exc:
                if directory.exists():  # another process created it meanwhile
                    raise DatabaseExistsError(
                        f"{directory} was created by someone else meanwhile; open it with Database.open"
                    ) from None
                raise exc
            fsync_dir(directory.parent)
    except BaseException:
        if fresh:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    return manifest
