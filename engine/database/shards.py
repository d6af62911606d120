"""A database split into shards by entry id, each searched by its own worker (a Ray actor, or a
thread in this process), the partial top-k merged.

Each shard holds the entries whose id is ``shard`` modulo the number of shards, with the whole
vocabulary (the same class ids), so a class's entries spread evenly and each shard stays a
complete, ordinary :class:`~knnclip.engine.Database`. A shard's top k is exact for its entries,
so the best k of all shards' top k is exactly the unsharded database's top k: the merge loses
nothing. :class:`ShardedDatabase` offers the read side of ``Database`` (``search``,
``vocabulary``, ``follow``...), so a :class:`~knnclip.engine.pipeline.segmenter.Segmenter`
searches it as it searches one database.

Layout: ``DIR/shards.json`` (the count and the shard directories) and ``DIR/shard-<i>/``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from knnclip.engine.database.database import Database, FollowResult, SearchResult
from knnclip.engine.database.indexes import IndexSpec
from knnclip.engine.database.vocabulary import Vocabulary
from knnclip.engine.errors import BackendUnavailableError, DatabaseCorruptError, InvalidInputError
from knnclip.engine.fsutil import atomic_write_bytes

__all__ = ["SHARDS_NAME", "ShardSearcher", "ShardedDatabase", "split_database"]

SHARDS_NAME = "shards.json"
_MAX_SHARDS = 4096


def split_database(
    source: str | os.PathLike[str],
    directory: str | os.PathLike[str],
    shards: int,
    *,
    index: str | None = None,
    storage: str | None = None,
    index_params: dict[str, Any] | None = None,
) -> list[Path]:
    """Split the database at ``source`` into ``shards`` databases under ``directory`` (which must
    not exist), entry ``i`` into shard ``i % shards``; each keeps the source's index kind unless
    ``index`` is given (built with :meth:`Database.convert`, so ids, classes and provenance are
    kept). Returns the shard directories."""
    if not isinstance(shards, int) or isinstance(shards, bool) or not 1 <= shards <= _MAX_SHARDS:
        raise InvalidInputError(f"shards must be an integer in [1, {_MAX_SHARDS}], got {shards!r}")
    out = Path(directory)
    if out.exists():
        raise InvalidInputError(f"{out} already exists; shards go to a new directory")
    with Database.open(source, read_only=True) as src:
        spec = src.index_spec
    kind = index or spec.kind
    params = index_params if index_params is not None or index else _user_params(spec)
    out.mkdir(parents=True)
    paths = []
    for shard in range(shards):
        path = out / f"shard-{shard}"
        Database.convert(
            source,
            path,
            index=kind,
            storage=storage or (spec.storage if not index else None),
            index_params=params,
            select=_shard_of(shard, shards),
        ).close()
        paths.append(path)
    body = {"format": 1, "shards": [p.name for p in paths], "rule": "entry id modulo shards"}
    atomic_write_bytes(out / SHARDS_NAME, json.dumps(body, indent=2).encode())
    return paths


def _shard_of(shard: int, shards: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda ids: ids % shards == shard


def _user_params(spec: IndexSpec) -> dict[str, Any]:
    """The spec's parameters a new database accepts (pq's storage is implied by its kind)."""
    return {k: v for k, v in spec.params.items() if v is not None}


def shard_paths(directory: str | os.PathLike[str]) -> list[Path]:
    """The shard directories that ``directory/shards.json`` lists (each inside ``directory``)."""
    root = Path(directory)
    try:
        body = json.loads((root / SHARDS_NAME).read_bytes())
        names = [str(n) for n in body["shards"]]
    except FileNotFoundError:
        raise FileNotFoundError(f"{root}: no {SHARDS_NAME} (split a database with split_database)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise DatabaseCorruptError(root / SHARDS_NAME, f"unreadable ({exc})") from None
    if not names or any(not n.startswith("shard-") or "/" in n or n in (".", "..") for n in names):
        raise DatabaseCorruptError(root / SHARDS_NAME, f"lists shards {names[:5]}; expected shard-<i> names")
    return [root / n for n in names]


class ShardSearcher:
    """One shard, opened read-only: what a shard's worker (a Ray actor, or a thread) runs."""

    def __init__(self, path: str, search: str = "fp32") -> None:
        self.db = Database.open(path, read_only=True, search=search)

    def search(
        self, queries: np.ndarray, k: int, nprobe: int | None, ef_search: int | None, rerank: int | None
    ) -> SearchResult:
        return self.db.search(queries, k, nprobe=nprobe, ef_search=ef_search, rerank=rerank)

    def follow(self) -> FollowResult:
        return self.db.follow()

    def summary(self) -> dict[str, Any]:
        """What the front needs to know of the shard: its size, position, vocabulary and index."""
        return {
            "entries": len(self.db),
            "lsn": self.db.lsn,
            "vocabulary": self.db.vocabulary.to_json(),
            "classes": self.db.classes,
            "dim": self.db.dim,
            "metric": self.db.metric,
            "index": self.db.index_spec.to_json(),
        }

    def stats(self) -> dict[str, Any]:
        return self.db.stats()

    def close(self) -> None:
        self.db.close()


class ShardedDatabase:
    """The shards of a split database, searched in parallel and merged exactly.

    ``workers="ray"`` runs each shard in a Ray actor (``ray.init`` first, or the default local
    instance is started); ``"threads"`` opens every shard in this process and searches them on
    a thread pool (FAISS releases the GIL). Read-only: changes go to the shards' own writers,
    and :meth:`follow` brings every shard up to date.
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, workers: str = "threads", cpus_per_shard: float = 1
    ) -> None:
        if workers not in ("ray", "threads"):
            raise InvalidInputError(f"workers must be 'ray' or 'threads', got {workers!r}")
        self.path = Path(directory)
        paths = shard_paths(self.path)
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        if workers == "ray":
            try:
                import ray
            except ImportError:
                from knnclip.engine.errors import needs_extra

                raise needs_extra("a sharded database on Ray actors", "ray") from None
            actor = ray.remote(ShardSearcher).options(num_cpus=cpus_per_shard)
            self._shards: list[Any] = [actor.remote(str(p)) for p in paths]
        else:
            self._shards = [ShardSearcher(str(p)) for p in paths]
            self._pool = ThreadPoolExecutor(max_workers=len(paths), thread_name_prefix="knnclip-shard")
        self._refresh()

    # Calling the shards ----------------------------------------------------------------------
    def _all(self, method: str, *args: Any) -> list[Any]:
        """``method(*args)`` on every shard at once; the answers in shard order."""
        if self.workers == "ray":
            import ray

            return list(ray.get([getattr(s, method).remote(*args) for s in self._shards]))
        assert self._pool is not None
        return list(self._pool.map(lambda s: getattr(s, method)(*args), self._shards))

    def _refresh(self) -> None:
        """Read every shard's summary; the vocabulary is their union, and shards must agree on
        every class they share (a class added through one shard's writer is in that shard only)."""
        summaries = self._all("summary")
        first = summaries[0]
        union = Vocabulary()
        for i, s in enumerate(summaries):
            if s["dim"] != first["dim"] or s["metric"] != first["metric"]:
                raise DatabaseCorruptError(self.path / f"shard-{i}", "its dim or metric differs from shard-0's")
            for info in Vocabulary.from_json(s["vocabulary"]).values():
                known = union.get(info.id)
                if known is not None and known != info:
                    raise DatabaseCorruptError(
                        self.path / f"shard-{i}",
                        f"class {info.id} is {info.name!r} here and {known.name!r} in an earlier shard",
                    )
                union.put(info)
        self._summaries, self._vocabulary = summaries, union

    # The read side of Database ---------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self._summaries[0]["dim"])

    @property
    def metric(self) -> str:
        return str(self._summaries[0]["metric"])

    @property
    def index_spec(self) -> IndexSpec:
        return IndexSpec.from_json(self._summaries[0]["index"])

    @property
    def vocabulary(self) -> Vocabulary:
        return self._vocabulary.copy()

    @property
    def classes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self._summaries:
            for name, n in s["classes"].items():
                counts[name] = counts.get(name, 0) + n
        return counts

    @property
    def lsn(self) -> int:
        """Changes whenever a shard changed (the sum of the shards' sequence numbers)."""
        return sum(int(s["lsn"]) for s in self._summaries)

    @property
    def read_only(self) -> bool:
        return True

    @property
    def shards(self) -> int:
        return len(self._shards)

    @property
    def device_search(self) -> None:
        return None

    def search_device(self, *args: Any, **kwargs: Any) -> Any:
        raise BackendUnavailableError("a sharded database searches on its shards' workers; use search()")

    def __len__(self) -> int:
        return sum(int(s["entries"]) for s in self._summaries)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
        rerank: int | None = None,
    ) -> SearchResult:
        """:meth:`Database.search` over every shard: each shard's top ``k``, merged into the best
        ``k`` (ties by entry id), as the unsharded database answers."""
        q = np.asarray(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InvalidInputError(f"queries must have shape [N, {self.dim}], got {list(q.shape)}")
        parts = self._all("search", q, k, nprobe, ef_search, rerank)
        return merge_top_k(parts, k)

    def follow(self) -> FollowResult:
        """Every shard follows its writer; the summed records and bytes, and whether any reloaded."""
        results = self._all("follow")
        self._refresh()
        return FollowResult(
            sum(r.records for r in results),
            sum(r.bytes_read for r in results),
            any(r.reloaded for r in results),
            self.lsn,
        )

    def stats(self) -> dict[str, Any]:
        per_shard = self._all("stats")
        return {
            "path": str(self.path),
            "shards": len(per_shard),
            "entries": sum(s["entries"] for s in per_shard),
            "resident_bytes": sum(s["resident_bytes"] for s in per_shard),
            "disk_bytes": sum(s["disk_bytes"] for s in per_shard),
            "per_shard": per_shard,
        }

    def close(self) -> None:
        if not self._shards:
            return
        try:
            self._all("close")
        finally:
            if self.workers == "ray":
                import ray

                for actor in self._shards:
                    ray.kill(actor)
            if self._pool is not None:
                self._pool.shutdown()
            self._shards = []

    def __enter__(self) -> ShardedDatabase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge_top_k(parts: list[SearchResult], k: int) -> SearchResult:
    """The best ``k`` of every part's rows (each part's rows sorted best first), ties broken
    by the lower entry id; -inf / -1 past the neighbours that exist."""
    sims = np.concatenate([p.sims for p in parts], axis=1)
    labels = np.concatenate([p.labels for p in parts], axis=1)
    ids = np.concatenate([p.ids for p in parts], axis=1)
    tie = np.where(ids >= 0, ids, np.iinfo(np.int64).max)
    order = np.lexsort((tie, -sims), axis=-1)[:, :k]
    return SearchResult(
        np.take_along_axis(sims, order, 1), np.take_along_axis(labels, order, 1), np.take_along_axis(ids, order, 1)
    )
