"""FAISS index construction from a small, JSON-serialisable spec.

=========  ==========================  =========================================================
kind       storage                     FAISS index
=========  ==========================  =========================================================
flat       fp32 / fp16 / sq8           IndexFlat / IndexScalarQuantizer (exact scan)
ivf-flat   fp32 / fp16 / sq8           IndexIVFFlat / IndexIVFScalarQuantizer
ivf-pq     pq (m sub-vectors x nbits)  IndexIVFPQ
hnsw       fp32 / fp16 / sq8           IndexHNSWFlat / IndexHNSWSQ
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
from knnclip.engine.errors import InvalidInputError

__all__ = ["INDEX_KINDS", "METRICS", "STORAGES", "IndexSpec", "build_index"]

# The parameters each kind accepts and their defaults; None means "chosen at training time".
_PARAMS: dict[str, dict[str, Any]] = {
    "flat": {},
    "ivf-flat": {"nlist": None, "nprobe": None},
    "ivf-pq": {"nlist": None, "nprobe": None, "m": None, "nbits": 8},
    "hnsw": {"M": 32, "ef_construction": 200, "ef_search": 128},
}
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
        if kind == "ivf-pq":
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
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise InvalidInputError(f"index parameter {name} must be a positive integer, got {value!r}")
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
            if p["nlist"] is None:
                # About 4 sqrt(n) lists, with at least 39 training points per centroid (FAISS's advice).
                p["nlist"] = max(1, min(int(4 * math.sqrt(n_train)), n_train // 39))
            if p["nprobe"] is None:
                p["nprobe"] = min(p["nlist"], max(8, p["nlist"] // 8))
        if self.kind == "ivf-pq" and p["m"] is None:
            # 8-d sub-vectors by default: 192 B per 1536-d entry (32x smaller than fp32). Finer codes
            # (m=dim/4) recall more but train about twice as long; see benchmarks/results/database.md.
            p["m"] = max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)
        return replace(self, params=p)

    def code_bytes(self, dim: int) -> float:
        """Bytes of one stored vector code (excluding ids and graph links)."""
        if self.storage == "pq":
            return self.params["m"] * self.params["nbits"] / 8 if self.params["m"] else math.nan
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


def scalar_quantizer(index: faiss.Index) -> Any:
    """The ScalarQuantizer inside ``index``, or None."""
    inner = faiss.downcast_index(index.storage) if isinstance(index, faiss.IndexHNSW) else index
    return getattr(inner, "sq", None)


def search_parameters(spec: IndexSpec, nprobe: int | None, ef_search: int | None) -> Any:
    """Per-call FAISS search parameters (thread-safe, unlike setting them on the index)."""
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
