"""FAISS index construction from a small, JSON-serialisable spec.

=========  ==========================  =========================================================
kind       storage                     FAISS index
=========  ==========================  =========================================================
flat       fp32 / fp16 / sq8           IndexFlat / IndexScalarQuantizer (exact scan)
ivf-flat   fp32 / fp16 / sq8           IndexIVFFlat / IndexIVFScalarQuantizer
ivf-pq     pq (m sub-vectors x nbits)  IndexIVFPQ
hnsw       fp32 / fp16 / sq8           IndexHNSWFlat / IndexHNSWSQ
ivf-rabitq sq8 / fp16 (re-rank store)  IndexIVFRaBitQFastScan (1 bit per dimension), maybe behind a
                                       projection to ``pca`` dimensions; candidates re-scored
                                       from a :class:`~.rerank_store.RerankStore`
=========  ==========================  =========================================================

``flat`` and ``hnsw`` number their entries by position (0..n-1, in insertion order); the IVF
indexes store the database's entry ids. Training is needed for IVF (coarse centroids), PQ
(codebooks) and sq8 (per-dimension ranges, widened by 10% on each side so vectors of classes
added later are clipped less).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import faiss
import numpy as np

from knnclip.engine.database.kinds import INDEX_KINDS, METRICS, STORAGES
from knnclip.engine.database.rerank_store import STORE_PLACES, STORE_PRECISIONS
from knnclip.engine.errors import InvalidInputError

__all__ = ["INDEX_KINDS", "METRICS", "STORAGES", "IndexSpec", "build_index", "index_resident_bytes", "train_index"]

# The parameters each kind accepts and their defaults; None means "chosen at training time".
_PARAMS: dict[str, dict[str, Any]] = {
    "flat": {},
    "ivf-flat": {"nlist": None, "nprobe": None},
    "ivf-pq": {"nlist": None, "nprobe": None, "m": None, "nbits": 8},
    "hnsw": {"M": 32, "ef_construction": 200, "ef_search": 128},
    # The defaults come from the sweep in benchmarks/results/vocabulary-scale-1000000.md.
    "ivf-rabitq": {"nlist": None, "nprobe": None, "rerank": 100, "store": "ram", "coarse": None, "pca": None},
}
# Parameters that are words, not counts, and the words they take.
_WORD_PARAMS = {"store": STORE_PLACES, "coarse": ("flat", "hnsw")}
# ivf-rabitq's coarse quantiser turns from an exact scan of the centroids to HNSW past this many lists.
HNSW_COARSE_FROM = 8192
# ivf-rabitq's default number of lists, and the fewest training points per list it accepts.
RABITQ_NLIST = 1024
_MIN_POINTS_PER_LIST = 39  # FAISS warns below this
_SQ_RANGE_MARGIN = 0.1
_QTYPES = {"fp16": faiss.ScalarQuantizer.QT_fp16, "sq8": faiss.ScalarQuantizer.QT_8bit}


@dataclass(frozen=True)
class IndexSpec:
    kind: str
    storage: str
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def make(cls, kind: str, storage: str | None, params: dict[str, Any] | None, dim: int) -> IndexSpec:
        """Validate a user's choice and fill in defaults."""
        if kind not in INDEX_KINDS:
            raise InvalidInputError(f"index must be one of {', '.join(INDEX_KINDS)}; got {kind!r}")
        if kind == "ivf-rabitq":
            if storage is None:
                storage = "sq8"
            elif storage not in STORE_PRECISIONS:
                precisions = " or ".join(STORE_PRECISIONS)
                raise InvalidInputError(f"ivf-rabitq re-ranks from {precisions} vectors; got storage {storage!r}")
        elif kind == "ivf-pq":
            if storage not in (None, "pq"):
                raise InvalidInputError(f"ivf-pq stores product-quantised codes; leave storage unset (got {storage!r})")
            storage = "pq"
        elif storage is None:
            storage = "fp16"
        elif storage not in STORAGES:
            raise InvalidInputError(f"storage must be one of {', '.join(STORAGES)}; got {storage!r}")
        given = dict(params or {})
        unknown = sorted(set(given) - set(_PARAMS[kind]))
        if unknown:
            allowed = ", ".join(_PARAMS[kind]) or "none"
            raise InvalidInputError(f"unknown parameters {unknown} for index {kind!r} (allowed: {allowed})")
        merged = {**_PARAMS[kind], **given}
        for name, value in merged.items():
            if name in _WORD_PARAMS:
                if value is not None and value not in _WORD_PARAMS[name]:
                    words = " or ".join(map(repr, _WORD_PARAMS[name]))
                    raise InvalidInputError(f"index parameter {name} must be {words}, got {value!r}")
            elif name == "rerank":  # 0: no re-rank, the codes' own ranking
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise InvalidInputError(f"index parameter rerank must be an integer >= 0, got {value!r}")
            elif value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise InvalidInputError(f"index parameter {name} must be a positive integer, got {value!r}")
        if kind == "ivf-rabitq" and merged["pca"] is not None and merged["pca"] > dim:
            raise InvalidInputError(f"ivf-rabitq: pca={merged['pca']} must be at most the dimension {dim}")
        if kind == "ivf-pq":
            if merged["m"] is not None and dim % merged["m"]:
                raise InvalidInputError(f"ivf-pq: m={merged['m']} must divide the dimension {dim}")
            if merged["nbits"] > 16:
                raise InvalidInputError(f"ivf-pq: nbits={merged['nbits']} must be at most 16")
        return cls(kind, storage, merged)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "storage": self.storage, "params": dict(self.params)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> IndexSpec:
        return cls(str(obj["kind"]), str(obj["storage"]), dict(obj["params"]))

    @property
    def needs_training(self) -> bool:
        return self.kind.startswith("ivf") or self.storage == "sq8"

    @property
    def positional(self) -> bool:
        """True when the index numbers entries by position instead of storing the entry ids."""
        return not self.kind.startswith("ivf")

    def min_training_points(self) -> int:
        need = 1
        if self.kind.startswith("ivf"):
            need = max(need, self.params["nlist"] or 1)
        if self.kind == "ivf-pq":
            need = max(need, 2 ** self.params["nbits"])
        if self.storage == "sq8":
            need = max(need, 2)
        return need

    def resolved_for(self, n_train: int, dim: int) -> IndexSpec:
        """Fill the parameters left to training time (nlist, nprobe, m) from the sample size."""
        p = dict(self.params)
        if self.kind.startswith("ivf"):
            if p["nlist"] is None and self.kind == "ivf-rabitq":
                # RABITQ_NLIST lists (the sweep's choice from 10^5 to 10^7 entries), fewer when
                # the sample cannot train them.
                p["nlist"] = max(1, min(RABITQ_NLIST, n_train // _MIN_POINTS_PER_LIST))
            elif p["nlist"] is None:
                # About 4 sqrt(n) lists, with at least 39 training points per centroid (FAISS's advice).
                p["nlist"] = max(1, min(int(4 * math.sqrt(n_train)), n_train // _MIN_POINTS_PER_LIST))
            if p["nprobe"] is None and self.kind == "ivf-rabitq":
                p["nprobe"] = min(p["nlist"], 8)
            elif p["nprobe"] is None:
                p["nprobe"] = min(p["nlist"], max(8, p["nlist"] // 8))
        if self.kind == "ivf-rabitq" and p["coarse"] is None:
            p["coarse"] = "hnsw" if p["nlist"] > HNSW_COARSE_FROM else "flat"
        if self.kind == "ivf-pq" and p["m"] is None:
            # 8-d sub-vectors by default: 192 B per 1536-d entry (32x smaller than fp32). Finer codes
            # (m=dim/4) recall more but train about twice as long; see benchmarks/results/database.md.
            p["m"] = max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)
        return replace(self, params=p)

    def coded_dim(self, dim: int) -> int:
        """The dimension the codes are made in (``pca`` when set)."""
        return int(self.params.get("pca") or dim)

    @property
    def rerank_store(self) -> bool:
        """True when the index keeps a :class:`~.rerank_store.RerankStore` beside its codes."""
        return self.kind == "ivf-rabitq"

    def code_bytes(self, dim: int) -> float:
        """Bytes of one stored vector code (excluding ids and graph links)."""
        if self.storage == "pq":
            return self.params["m"] * self.params["nbits"] / 8 if self.params["m"] else math.nan
        if self.kind == "ivf-rabitq":  # a bit per (projected) dimension and two float factors
            return (self.coded_dim(dim) + 7) // 8 + 8
        return dim * {"fp32": 4, "fp16": 2, "sq8": 1}[self.storage]


def faiss_metric(metric: str) -> int:
    if metric not in METRICS:
        raise InvalidInputError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    return faiss.METRIC_INNER_PRODUCT


def build_index(spec: IndexSpec, dim: int, metric: str) -> faiss.Index:
    """An empty FAISS index for ``spec``; IVF and PQ parameters must be resolved already."""
    m = faiss_metric(metric)
    p = spec.params
    if spec.kind == "flat":
        index = (
            faiss.IndexFlat(dim, m)
            if spec.storage == "fp32"
            else faiss.IndexScalarQuantizer(dim, _QTYPES[spec.storage], m)
        )
    elif spec.kind == "hnsw":
        if spec.storage == "fp32":
            index = faiss.IndexHNSWFlat(dim, p["M"], m)
        else:
            index = faiss.IndexHNSWSQ(dim, _QTYPES[spec.storage], p["M"], m)
        index.hnsw.efConstruction = p["ef_construction"]
        index.hnsw.efSearch = p["ef_search"]
    elif spec.kind == "ivf-rabitq":
        return _rabitq_index(spec, dim, m)
    else:
        quantizer = faiss.IndexFlat(dim, m)
        if spec.kind == "ivf-pq":
            index = faiss.IndexIVFPQ(quantizer, dim, p["nlist"], p["m"], p["nbits"], m)
        elif spec.storage == "fp32":
            index = faiss.IndexIVFFlat(quantizer, dim, p["nlist"], m)
        else:
            index = faiss.IndexIVFScalarQuantizer(quantizer, dim, p["nlist"], _QTYPES[spec.storage], m)
        index.nprobe = p["nprobe"]
        # The index frees the quantizer, not Python's wrapper (it may be garbage-collected first).
        quantizer.this.disown()
        index.own_fields = True
    sq = scalar_quantizer(index)
    if sq is not None:
        sq.rangestat = faiss.ScalarQuantizer.RS_minmax
        sq.rangestat_arg = _SQ_RANGE_MARGIN
    return index


def _rabitq_index(spec: IndexSpec, dim: int, metric: int) -> faiss.Index:
    """IVF-RaBitQ over ``spec.coded_dim`` dimensions: behind an uncentred principal-axes
    projection when ``pca`` is set (:func:`train_projection`; inner products survive it, which
    a centred PCA's would not)."""
    p = spec.params
    d = spec.coded_dim(dim)
    quantizer = faiss.IndexHNSWFlat(d, 32, metric) if p["coarse"] == "hnsw" else faiss.IndexFlat(d, metric)
    # The fast-scan layout (codes in blocks of 32, scored with SIMD lookup tables) proposes the
    # same candidates as the plain one, 1.5x faster on lists of 10^4 entries (measured with
    # faiss 1.15 on 4*10^5 x 1536, 40 lists, 250 queries), and removes by id as IVF indexes do.
    ivf = faiss.IndexIVFRaBitQFastScan(quantizer, d, p["nlist"], metric)
    ivf.nprobe = p["nprobe"]
    quantizer.this.disown()
    ivf.own_fields = True
    if d == dim:
        return ivf
    projection = faiss.LinearTransform(dim, d, False)
    index = faiss.IndexPreTransform(projection, ivf)
    projection.this.disown()
    ivf.this.disown()
    index.own_fields = True
    return index


def train_index(index: faiss.Index, spec: IndexSpec, samples: np.ndarray) -> None:
    """Train ``index`` (from :func:`build_index`) on ``samples``: the projection first, from
    the samples' uncentred second moment, where the spec has one."""
    if isinstance(index, faiss.IndexPreTransform):
        projection = faiss.downcast_VectorTransform(index.chain.at(0))
        d = projection.d_out
        moment = samples.T.astype(np.float64) @ samples.astype(np.float64)
        _, vectors = np.linalg.eigh(moment)
        axes = np.ascontiguousarray(vectors[:, ::-1][:, :d].T, np.float32)  # [d_out, d_in], largest first
        faiss.copy_array_to_vector(axes.ravel(), projection.A)
        projection.is_trained = True
        index.index.train(np.ascontiguousarray(projection.apply(samples)))
        index.is_trained = True
        return
    index.train(samples)


def index_resident_bytes(index: faiss.Index | None) -> int:
    """The bytes ``index`` holds in memory: codes, ids, centroids, projections and graph links
    (FAISS keeps every index wholly in RAM)."""
    if index is None:
        return 0
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        projection = faiss.downcast_VectorTransform(index.chain.at(0))
        return projection.A.size() * 4 + projection.b.size() * 4 + index_resident_bytes(index.index)
    if isinstance(index, faiss.IndexIVF):
        lists = index.ntotal * (index.code_size + 8)  # codes and their ids
        return lists + index_resident_bytes(index.quantizer)
    if isinstance(index, faiss.IndexHNSW):
        links = index.hnsw.neighbors.size() * 4 + index.hnsw.levels.size() * 4 + index.hnsw.offsets.size() * 8
        return links + index_resident_bytes(index.storage)
    return int(index.ntotal * getattr(index, "code_size", index.d * 4))


def scalar_quantizer(index: faiss.Index) -> Any:
    """The ScalarQuantizer inside ``index``, or None."""
    inner = faiss.downcast_index(index.storage) if isinstance(index, faiss.IndexHNSW) else index
    return getattr(inner, "sq", None)


def search_parameters(spec: IndexSpec, nprobe: int | None, ef_search: int | None) -> Any:
    """Per-call FAISS search parameters (thread-safe, unlike setting them on the index)."""
    if spec.kind == "ivf-rabitq":
        ivf = faiss.IVFSearchParameters(nprobe=int(nprobe or spec.params["nprobe"]))
        if not spec.params.get("pca"):
            return ivf
        outer = faiss.SearchParametersPreTransform(index_params=ivf)
        outer.referenced_objects = [ivf]  # the C++ object points at ivf's: keep it alive
        return outer
    if spec.kind.startswith("ivf"):
        return faiss.SearchParametersIVF(nprobe=int(nprobe or spec.params["nprobe"]))
    if spec.kind == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=int(ef_search or spec.params["ef_search"]))
    return None


def remove_entries(index: faiss.Index, spec: IndexSpec, keep: np.ndarray, ids: np.ndarray) -> faiss.Index:
    """Remove the entries where ``keep`` is False (positions aligned with ``ids``); return the index.

    Flat indexes compact in place and keep the survivors' order. IVF indexes remove by id. HNSW
    cannot remove, so its survivors are decoded and re-inserted into a fresh graph (the trained
    storage is kept, and fp16/sq8 codes re-encode to themselves).
    """
    drop = np.flatnonzero(~keep).astype(np.int64)
    if drop.size == 0:
        return index
    if spec.kind == "flat":
        removed = index.remove_ids(faiss.IDSelectorBatch(drop))
    elif spec.kind.startswith("ivf"):
        removed = index.remove_ids(faiss.IDSelectorBatch(ids[drop]))
    else:
        survivors = index.reconstruct_n(0, index.ntotal)[keep]
        index.reset()
        if len(survivors):
            index.add(survivors)
        removed = drop.size
    if removed != drop.size:
        raise RuntimeError(f"FAISS removed {removed} entries, expected {drop.size}")
    return index
