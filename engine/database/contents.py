"""What a database holds in memory: the FAISS index, the entry ids and class ids in index order,
the vocabulary, and the log sequence number they are current to. Changes arrive as log records
(:meth:`Contents.apply`), the same way whether they were just written or are being replayed, so
the writer and a reopened database end in the same state. No file is touched here.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from knnclip.engine.database import flat_scan
from knnclip.engine.database.indexes import IndexSpec, index_resident_bytes, remove_entries
from knnclip.engine.database.manifest import Manifest
from knnclip.engine.database.rerank_store import RerankStore
from knnclip.engine.database.vocabulary import ClassInfo
from knnclip.engine.database.wal import Record, RecordKind
from knnclip.engine.errors import DatabaseCorruptError, UnknownClassError


class Provenance:
    """Where each entry came from, aligned with the entries (index order): the source it was added
    from (an index into ``names``, -1 where none was recorded), the mask's index (in its image,
    where the caller said, else its position in the ``add`` call), and the time it was added
    (seconds since the epoch, NaN where unknown: entries from before provenance was kept)."""

    def __init__(
        self,
        names: list[str] | None = None,
        source: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        time: np.ndarray | None = None,
    ) -> None:
        self.names: list[str] = names or []
        self.source = np.zeros(0, np.int32) if source is None else np.asarray(source, np.int32)
        self.mask = np.zeros(0, np.int32) if mask is None else np.asarray(mask, np.int32)
        self.time = np.zeros(0, np.float64) if time is None else np.asarray(time, np.float64)

    @classmethod
    def unknown(cls, n: int) -> Provenance:
        return cls([], np.full(n, -1, np.int32), np.full(n, -1, np.int32), np.full(n, np.nan))

    @classmethod
    def of_record(cls, meta: Any, n: int) -> Provenance:
        """The provenance of an add record's ``n`` entries (``{"sources", "of", "time"}``; an older
        record without it: unknown)."""
        if meta is None:
            return cls.unknown(n)
        names = [str(s) for s in meta["sources"]]
        of = meta.get("of")  # absent: every entry from the one source named, or from none
        source = np.full(n, 0 if names else -1, np.int32) if of is None else np.asarray(of, np.int32)
        if len(source) != n or (len(source) and (source.min() < -1 or source.max() >= len(names))):
            raise ValueError("add record's provenance does not fit its entries")
        mask = np.asarray(meta["mask"], np.int32) if "mask" in meta else np.arange(n, dtype=np.int32)
        if len(mask) != n:
            raise ValueError("add record's mask indices do not fit its entries")
        return cls(names, source, mask, np.full(n, float(meta["time"])))

    def appended(self, other: Provenance) -> Provenance:
        """Both, ``other``'s after this one's; source names merged into one table."""
        index = {name: i for i, name in enumerate(self.names)}
        names = list(self.names)
        remap = np.empty(len(other.names) + 1, np.int32)
        remap[-1] = -1  # -1 stays "none"
        for i, name in enumerate(other.names):
            if name not in index:
                index[name] = len(names)
                names.append(name)
            remap[i] = index[name]
        return Provenance(
            names,
            np.concatenate([self.source, remap[other.source]]),
            np.concatenate([self.mask, other.mask]),
            np.concatenate([self.time, other.time]),
        )

    def kept(self, keep: np.ndarray) -> Provenance:
        return Provenance(self.names, self.source[keep], self.mask[keep], self.time[keep])

    def source_of(self, position: int) -> str | None:
        s = int(self.source[position])
        return None if s < 0 else self.names[s]

    def where_source(self, name: str) -> np.ndarray:
        """Positions of the entries added from ``name``."""
        try:
            return np.flatnonzero(self.source == self.names.index(name))
        except ValueError:
            return np.zeros(0, np.int64)


class Contents:
    """The in-memory state of a database at sequence number ``lsn``."""

    def __init__(self, manifest: Manifest) -> None:
        self.spec: IndexSpec = manifest.index
        self.dim = manifest.dim
        self.metric = manifest.metric
        self.vocab = manifest.vocabulary.copy()
        self.index: faiss.Index | None = None
        # ivf-rabitq's vectors at sq8/fp16, to re-score what its 1-bit codes propose.
        self.store: RerankStore | None = None
        self.ids = np.zeros(0, np.int64)
        self.labels = np.zeros(0, np.int64)
        self.provenance = Provenance()
        self.counts: dict[int, int] = {}
        self.next_id = manifest.next_entry_id
        self.lsn = manifest.checkpoint_lsn
        # A search mirror kept in step with the index: on the GPU (database/gpu.py) or in bf16
        # (database/bf16_search.py); None searches the faiss index itself.
        self.mirror: Any = None
        # The entry ids and class ids on a device, as of an lsn, for search_device (per device).
        self._on_device: dict[str, tuple[int, Any, Any]] = {}

    @property
    def is_trained(self) -> bool:
        return self.index is not None and bool(self.index.is_trained)

    def set_entries(self, ids: np.ndarray, labels: np.ndarray, provenance: Provenance | None = None) -> None:
        """The entries in index order, and where each came from (none known by default)."""
        self.ids, self.labels = ids, labels
        self.provenance = provenance if provenance is not None else Provenance.unknown(len(ids))
        self.counts = dict(zip(*(a.tolist() for a in np.unique(labels, return_counts=True)), strict=True))

    def resident_bytes(self) -> dict[str, int]:
        """Bytes held in memory: the index, the entry arrays (ids, classes, provenance) and the
        re-rank store's part in RAM (a memory-mapped store's rows are page cache, not counted)."""
        p = self.provenance
        return {
            "index": index_resident_bytes(self.index),
            "entries": self.ids.nbytes + self.labels.nbytes + p.source.nbytes + p.mask.nbytes + p.time.nbytes,
            "store": self.store.resident_bytes() if self.store is not None else 0,
        }

    def class_counts(self) -> dict[str, int]:
        """Class name -> number of entries, for every class in the vocabulary (in id order)."""
        return {info.name: self.counts.get(cid, 0) for cid, info in sorted(self.vocab.items())}

    def apply_all(self, records: Iterable[Record], source: Path) -> None:
        """Apply log records in order (replay, following, shipped records); a record that does
        not fit is a DatabaseCorruptError naming ``source``, and the ones before it stay applied."""
        for record in records:
            try:
                self.apply(record)
            except (KeyError, ValueError, TypeError, UnknownClassError) as exc:
                raise DatabaseCorruptError(source, f"record {record.lsn} cannot be applied ({exc})") from None

    def apply(self, record: Record) -> None:
        """Apply one log record; raises ValueError (or KeyError, UnknownClassError) when it does not fit."""
        meta = record.meta
        if record.kind == RecordKind.ADD:
            self._add(meta, record.body)
        elif record.kind == RecordKind.REMOVE_CLASS:
            self._remove_class(int(meta["class_id"]))
        elif record.kind == RecordKind.PUT_CLASS:
            self.vocab.put(ClassInfo.from_json(meta["class"]))
        elif record.kind == RecordKind.REMOVE_ENTRIES:
            n = int(meta["n"])
            if len(record.body) != 8 * n:
                raise ValueError(f"remove-entries record of {n} ids has {len(record.body)} bytes")
            self._remove_entries(np.frombuffer(record.body, np.int64, n))
        elif record.kind == RecordKind.MERGE_CLASSES:
            self._merge_classes(int(meta["source"]), ClassInfo.from_json(meta["class"]))
        self.lsn = record.lsn

    def _add(self, meta: dict[str, Any], body: memoryview) -> None:
        n, dim, first = int(meta["n"]), int(meta["dim"]), int(meta["first_id"])
        if dim != self.dim or len(body) != n * 8 + n * dim * 4 or first < self.next_id:
            raise ValueError(f"add record of {n}x{dim} with first id {first} does not fit this database")
        class_ids = np.frombuffer(body, np.int64, n)
        vectors = np.frombuffer(body, np.float32, n * dim, offset=n * 8).reshape(n, dim)
        for c in meta["classes"]:
            self.vocab.put(ClassInfo.from_json(c))
        if not set(np.unique(class_ids).tolist()) <= set(self.vocab):
            raise ValueError("add record refers to unknown classes")
        if self.index is None or not self.index.is_trained:
            raise ValueError("add record before the index was trained")
        new_ids = np.arange(first, first + n, dtype=np.int64)
        if self.spec.positional:
            self.index.add(vectors)
        else:
            self.index.add_with_ids(vectors, new_ids)
        if self.mirror is not None:
            self.mirror.add(vectors, new_ids)
        if self.store is not None:
            self.store.add(vectors)
        self.ids = np.concatenate([self.ids, new_ids])
        self.labels = np.concatenate([self.labels, class_ids])
        self.provenance = self.provenance.appended(Provenance.of_record(meta.get("provenance"), n))
        for cid, count in zip(*np.unique(class_ids, return_counts=True), strict=True):
            self.counts[int(cid)] = self.counts.get(int(cid), 0) + int(count)
        self.next_id = first + n

    def _remove_class(self, class_id: int) -> None:
        self.vocab.remove(class_id)
        keep = self.labels != class_id
        if not keep.all():
            self._keep(keep)
            self.ids, self.labels, self.provenance = self.ids[keep], self.labels[keep], self.provenance.kept(keep)
            if self.mirror is not None:
                self.mirror.rebuild(self.index)
        self.counts.pop(class_id, None)

    def _remove_entries(self, ids: np.ndarray) -> None:
        keep = ~np.isin(self.ids, ids)
        if keep.all():
            return
        self._keep(keep)
        self.set_entries(self.ids[keep], self.labels[keep], self.provenance.kept(keep))
        if self.mirror is not None:
            self.mirror.rebuild(self.index)

    def _keep(self, keep: np.ndarray) -> None:
        """Drop the entries where ``keep`` is False from the index and the store (not the arrays)."""
        self.index = remove_entries(self.index, self.spec, keep, self.ids)
        if self.store is not None:
            self.store.keep(keep)

    def _merge_classes(self, source: int, target: ClassInfo) -> None:
        if source == target.id or source not in self.vocab or target.id not in self.vocab:
            raise ValueError(f"merge record of class {source} into {target.id} does not fit this vocabulary")
        self.vocab.remove(source)
        self.vocab.put(target)
        moved = self.labels == source
        if moved.any():
            self.set_entries(self.ids, np.where(moved, target.id, self.labels), self.provenance)

    def _reranked(self, q: np.ndarray, k: int, params: Any, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """The codes' top ``depth`` candidates re-scored from the store: (sims, entry ids) [M, k]."""
        assert self.index is not None and self.store is not None
        _, candidates = self.index.search(q, max(k, depth), params=params)
        real = candidates >= 0
        positions = np.where(real, np.searchsorted(self.ids, np.where(real, candidates, 0)), -1)
        scores = self.store.scores(q, positions)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        sims = np.take_along_axis(scores, order, 1)
        ids = np.where(np.isfinite(sims), np.take_along_axis(candidates, order, 1), -1)
        return sims, ids

    def search_device(self, q: Any, k: int, params: Any) -> tuple[Any, Any]:
        """(sims, class ids) [M, k] of normalised torch queries ``q`` through the mirror's
        ``search_device``, on ``q``'s device: -inf / -1 where there is no neighbour (a cosine query
        of zeros has none)."""
        import torch

        m, n = int(q.shape[0]), len(self.ids)
        sims = torch.full((m, k), float("-inf"), dtype=torch.float32, device=q.device)
        labels = torch.full((m, k), -1, dtype=torch.int64, device=q.device)
        if m == 0 or n == 0:
            return sims, labels
        found_sims, found = self.mirror.search_device(q.contiguous(), k, params)
        ids, classes = self._entries_on(q.device)
        hit = found >= 0
        if self.metric == "cosine":
            hit = hit & (q != 0).any(dim=1, keepdim=True)
        found = found.clamp_min(0)
        pos = found if self.spec.positional else torch.searchsorted(ids, found).clamp_max(n - 1)
        return torch.where(hit, found_sims.float(), sims), torch.where(hit, classes[pos], labels)

    def _entries_on(self, device: Any) -> tuple[Any, Any]:
        import torch

        cached = self._on_device.get(str(device))
        if cached is None or cached[0] != self.lsn:
            ids, classes = (torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in (self.ids, self.labels))
            cached = self._on_device[str(device)] = (self.lsn, ids, classes)
        return cached[1], cached[2]

    def search(self, q: np.ndarray, k: int, params: Any, rerank: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sims, labels, ids) [M, k] of normalised queries ``q``; -inf / -1 where there is no
        neighbour. ``rerank`` > 0 re-scores that many candidates from the store (ivf-rabitq)."""
        m = len(q)
        sims = np.full((m, k), -np.inf, np.float32)
        labels = np.full((m, k), -1, np.int64)
        ids = np.full((m, k), -1, np.int64)
        if m == 0 or len(self.ids) == 0:
            return sims, labels, ids
        # A cosine query of zeros (an empty mask) has no direction and no neighbours: it is
        # not searched at all (FC-CLIP leaves many of its queries empty).
        searched = np.any(q != 0, axis=1) if self.metric == "cosine" else np.ones(m, bool)
        found_sims = np.full((m, k), -np.inf, np.float32)
        found = np.full((m, k), -1, np.int64)
        if searched.any():
            sub = q if searched.all() else np.ascontiguousarray(q[searched])
            if self.mirror is not None and self.mirror.can_search(k, params):
                found_sims[searched], found[searched] = self.mirror.search(sub, k, params)
            elif self.spec.kind == "flat" and self.spec.storage in ("fp16", "sq8"):
                found_sims[searched], found[searched] = flat_scan.scan(self.index, self.spec.storage, sub, k)
            elif self.store is not None and rerank > 0:
                found_sims[searched], found[searched] = self._reranked(sub, k, params, rerank)
            else:
                assert self.index is not None  # entries exist, so the index does
                found_sims[searched], found[searched] = self.index.search(sub, k, params=params)
        hit = found >= 0
        pos = found[hit] if self.spec.positional else np.searchsorted(self.ids, found[hit])
        sims[hit] = found_sims[hit]
        labels[hit] = self.labels[pos]
        ids[hit] = self.ids[pos]
        return sims, labels, ids
