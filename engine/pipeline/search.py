"""Retrieval where the queries are: the database's own search on the host, or an exact scan of a
copy of a flat database on the queries' device, so the queries never leave it.

:class:`DeviceScan` keeps the stored vectors (fp16 where the index stores fp16 or sq8, as
faiss-gpu does) and their class ids on ``xp``'s device, current with the database's
:attr:`~knnclip.engine.database.Database.lsn` (an append uploads the new entries only, any other
change uploads the copy again). It scans in chunks of rows, each widened to fp32 for its matrix
product, with a running top-k: similarities are fp32 throughout (an fp16 product rounds them and
overflows past 65504 for inner products) and no [queries x entries] matrix is ever made
(250 x 10^7 scores would be 10 GB).

Other indexes (IVF) are searched by faiss-gpu in place where the database was opened with
``device="cuda"`` (:meth:`Database.search_device`), and otherwise by faiss on the host: the
queries go there and the neighbours come back, counted as ``search`` transfers.
"""

from __future__ import annotations

import threading

import numpy as np

from knnclip.engine.database import Database
from knnclip.engine.errors import InvalidInputError
from knnclip.engine.pipeline.arrays import HOST, Array, ArrayModule


class DeviceScan:
    """Exact k-nearest-neighbour search of a flat database on ``xp``'s device."""

    SCORE_BYTES = 256 << 20  # one chunk's [queries x rows] fp32 scores
    UPLOAD_ROWS = 1 << 16  # rows read from the database per upload (bounds the host copy)

    def __init__(self, database: Database, xp: ArrayModule) -> None:
        if database.index_spec.kind != "flat":
            raise InvalidInputError(f"an exact device scan is for flat indexes, not {database.index_spec.kind}")
        self.db, self.xp = database, xp
        self._half = database.index_spec.storage != "fp32"
        self._lock = threading.Lock()
        self._lsn: int | None = None
        self._ids = np.zeros(0, np.int64)
        self._vectors: Array = None
        self._labels: Array = None

    def _upload(self, ids: np.ndarray) -> Array:
        """The vectors of entries ``ids`` on the device, read and sent in bounded pieces."""
        pieces = []
        for start in range(0, len(ids), self.UPLOAD_ROWS):
            host = self.db.vectors(ids[start : start + self.UPLOAD_ROWS])
            pieces.append(self.xp.upload(host.astype(np.float16) if self._half else host, "constant"))
        dtype = "float16" if self._half else "float32"
        return self.xp.concatenate(pieces) if pieces else self.xp.zeros((0, self.db.dim), dtype)

    def _sync(self) -> None:
        for attempt in range(3):
            try:
                return self._sync_once()
            except InvalidInputError:  # entries removed between reading their ids and their vectors
                if attempt == 2:
                    raise

    def _sync_once(self) -> None:
        lsn = self.db.lsn
        if lsn == self._lsn:
            return
        ids, labels = self.db.ids_and_labels()
        old = len(self._ids)
        if self._vectors is not None and len(ids) >= old and np.array_equal(ids[:old], self._ids):
            if len(ids) > old:  # appended: upload the new rows only
                self._vectors = self.xp.concatenate([self._vectors, self._upload(ids[old:])])
        else:
            self._vectors = self._upload(ids)
        self._labels = self.xp.upload(labels.astype(np.int64), "constant")
        self._ids, self._lsn = ids, lsn

    def search(self, queries: Array, k: int) -> tuple[Array, Array]:
        """(similarities [Q, k] float32, class ids [Q, k] int64), best first, on the device: -inf and
        -1 where there are fewer than k entries, and for an all-zero query of a cosine database."""
        xp = self.xp
        with self._lock:
            self._sync()
            vectors, labels = self._vectors, self._labels
        q = xp.astype(queries, "float32")
        m, n = int(q.shape[0]), int(vectors.shape[0])
        sims = xp.full((m, k), -np.inf, "float32")
        found = xp.full((m, k), -1, "int64")
        top = min(k, n)
        if top == 0 or m == 0:
            return sims, found
        searched = None
        if self.db.metric == "cosine":
            norms = xp.norm(q)
            searched = norms[:, 0] > 0
            q = q / xp.where(norms > 0, norms, 1.0)
        rows = max(top, self.SCORE_BYTES // (4 * m))
        best_values = best_index = None
        for start in range(0, n, rows):
            scores = xp.matmul(q, xp.transpose(xp.astype(vectors[start : start + rows], "float32")))
            values, index = xp.topk(scores, min(top, int(scores.shape[1])))
            index = index + start
            if best_values is not None:  # the running top-k (which of equal similarities stays is open, as in faiss)
                values = xp.concatenate([best_values, values], axis=1)
                index = xp.concatenate([best_index, index], axis=1)
                values, order = xp.topk(values, top)
                index = xp.take_along(index, order, axis=1)
            best_values, best_index = values, index
        assert best_values is not None and best_index is not None
        best_labels = xp.take(labels, best_index)
        if searched is not None:  # a zero query has no direction and no neighbours
            best_values = xp.where(searched[:, None], best_values, -np.inf)
            best_labels = xp.where(searched[:, None], best_labels, -1)
        sims[:, :top] = best_values
        found[:, :top] = best_labels
        return sims, found


def search_neighbours(
    database: Database, queries: Array, k: int, *, xp: ArrayModule = HOST, scan: DeviceScan | None = None
) -> tuple[Array, Array]:
    """The ``k`` nearest entries of each query on ``xp``'s device: (similarities [Q, k], class ids
    [Q, k], -1 where there is no neighbour). With ``scan`` (a flat database's device copy), or a
    database opened on the GPU (faiss-gpu), the queries stay on the device; otherwise faiss
    searches them on the host."""
    if scan is not None:
        return scan.search(queries, k)
    if xp.on_host:
        sims, labels, _ = database.search(queries, k)
        return sims, labels
    if xp.name == "torch" and database.device_search is not None:  # faiss-gpu reads the queries in place
        return database.search_device(queries, k)
    sims, labels, _ = database.search(xp.to_host(queries, "search"), k)
    return xp.upload(sims, "search"), xp.upload(labels, "search")


def device_scan_for(database: Database, xp: ArrayModule, wanted: bool | None = None) -> DeviceScan | None:
    """A :class:`DeviceScan` of a flat database where ``wanted`` (by default: where the queries
    live on a device), else None (faiss searches)."""
    flat = database.index_spec.kind == "flat"
    if wanted and not flat:
        raise InvalidInputError(
            f"device_scan=True is an exact scan, for flat indexes; this database's is {database.index_spec.kind}"
        )
    if not flat or not (wanted if wanted is not None else not xp.on_host):
        return None
    return DeviceScan(database, xp)
