"""The ivf-rabitq index: 1-bit codes whose candidates are re-scored from an sq8/fp16 store in RAM or
memory-mapped from disk, on real FAISS indexes and files, against NumPy float64 from the definition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from knnclip.engine import Database
from knnclip.engine.bench.embeddings import EmbeddingGenerator
from knnclip.engine.errors import DatabaseCorruptError, InvalidInputError
from tests.support.db_helpers import exact_topk

DIM = 64
N = 2400
# Structured like mask embeddings (classes of sub-centres, a decaying spectrum): 1-bit codes
# rank such data well enough for a re-rank of the top 100 to find the true neighbours, as they
# do real embeddings (i.i.d. noise around a few centres has no order for any code to keep).
DATA = EmbeddingGenerator(dim=DIM, classes=40, rank=DIM, chunk=1024)


def make(path: Path, storage: str = "sq8", **params) -> tuple[Database, np.ndarray, np.ndarray]:
    """A trained ivf-rabitq database holding N synthetic mask embeddings."""
    x, labels = DATA.sample(N, 1)
    db = Database.create(path, DIM, index="ivf-rabitq", storage=storage, index_params=params or None)
    db.train(DATA.sample(1200, 2)[0])
    db.add(x[: N // 2], [f"c{c}" for c in labels[: N // 2]])
    db.checkpoint()
    db.add(x[N // 2 :], [f"c{c}" for c in labels[N // 2 :]])
    return db, x, labels


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found.tolist(), exact.tolist(), strict=True)]))


@pytest.mark.parametrize("storage", ["sq8", "fp16"])
def test_full_rerank_equals_exact_search_of_the_stored_vectors(tmp_path: Path, storage: str) -> None:
    """Probing every list and re-scoring every candidate is exact search over the store's
    decoded vectors: the sims are those of float64 from the definition, to the store's precision."""
    db, x, _ = make(tmp_path / "db", storage)
    queries = DATA.sample(30, 12)[0]
    nlist = db.index_spec.params["nlist"]
    with db:
        sims, _, ids = db.search(queries, 10, nprobe=nlist, rerank=N)
    ref_sims, ref_pos = exact_topk(x, queries, 10)
    atol = 2e-2 if storage == "sq8" else 2e-3
    np.testing.assert_allclose(sims, ref_sims, atol=atol)
    assert recall(ids, ref_pos) >= 0.97


def test_rerank_is_what_makes_the_codes_exact(tmp_path: Path) -> None:
    db, x, _ = make(tmp_path / "db", "fp16")
    queries = DATA.sample(60, 13)[0]
    _, ref_pos = exact_topk(x, queries, 10)
    with db:
        nlist = db.index_spec.params["nlist"]
        codes_only = db.search(queries, 10, nprobe=nlist, rerank=0)
        reranked = db.search(queries, 10, nprobe=nlist, rerank=100)
        default = db.search(queries, 10)
    # the 1-bit codes' estimates are not cosines: re-scoring replaces them
    ref_sims = np.sort(x.astype(np.float64) @ (queries / np.linalg.norm(queries, axis=1, keepdims=True)).T, axis=0)
    assert not np.allclose(codes_only.sims, ref_sims[::-1][:10].T, atol=1e-3)
    assert recall(reranked.ids, ref_pos) > recall(codes_only.ids, ref_pos)
    assert recall(reranked.ids, ref_pos) >= 0.97
    assert db.index_spec.params["rerank"] == 100, "search re-ranks by default"
    assert recall(default.ids, ref_pos) > 0.5


@pytest.mark.parametrize("place", ["ram", "disk"])
def test_store_survives_checkpoints_reopen_and_removals(tmp_path: Path, place: str) -> None:
    path = tmp_path / "db"
    db, x, labels = make(path, "sq8", store=place)
    queries = DATA.sample(20, 14)[0]
    segments = sorted(p.name for p in path.glob("store.*.npy"))
    assert len(segments) == 1, "the first checkpoint wrote the first half as one segment"
    db.checkpoint()
    merged = sorted(p.name for p in path.glob("store.*.npy"))
    assert len(merged) == 1 and merged != segments, "as many new rows as stored: merged into one segment"
    more = DATA.sample(100, 40)[0]
    db.add(more, ["late"] * 100)
    db.checkpoint()
    appended = sorted(p.name for p in path.glob("store.*.npy"))
    assert len(appended) == 2 and appended[0] == merged[0], "a few new rows: a segment of their own, the old kept"
    before = db.search(queries, 8)
    db.close()
    with Database.open(path) as db:
        again = db.search(queries, 8)
        np.testing.assert_array_equal(again.ids, before.ids)
        np.testing.assert_allclose(again.sims, before.sims, atol=1e-6)
        stats = db.stats()
        assert stats["store"]["place"] == place and stats["store"]["disk_bytes"] == (N + 100) * DIM
        assert (stats["resident_parts"]["store"] < 20_000) == (place == "disk"), stats["resident_parts"]
        gone = np.flatnonzero(labels == labels[0])
        db.remove_entries(gone)
        kept = db.search(queries, 8, nprobe=db.index_spec.params["nlist"], rerank=N)
        assert not np.isin(kept.ids, gone).any()
        np.testing.assert_allclose(db.vectors([1]), x[[1]] / np.linalg.norm(x[1]), atol=2e-2)
        db.checkpoint()
        assert len(list(path.glob("store.*.npy"))) == 1, "removals compact the store into one segment"
        compacted = db.search(queries, 8, nprobe=db.index_spec.params["nlist"], rerank=N)
    with Database.open(path, read_only=True) as db:
        reopened = db.search(queries, 8, nprobe=db.index_spec.params["nlist"], rerank=N)
        np.testing.assert_array_equal(reopened.ids, compacted.ids)
        np.testing.assert_array_equal(reopened.ids, kept.ids)
        assert len(db) == N + 100 - len(gone)


def test_disk_store_is_memory_mapped_and_costs_no_resident_rows(tmp_path: Path) -> None:
    db, _, _ = make(tmp_path / "db", "sq8", store="disk")
    with db:
        pending = db.stats()["resident_parts"]["store"]
        assert pending >= (N // 2) * DIM, "rows added since the checkpoint are held until the next one"
        db.checkpoint()
        st = db.stats()
    assert st["resident_parts"]["store"] < 2 * 4 * DIM + 64, "after a checkpoint only the ranges are resident"
    assert st["store"]["disk_bytes"] == N * DIM
    assert st["code_bytes_per_entry"] == DIM // 8 + 8


def test_projected_codes_still_rerank_to_exact(tmp_path: Path) -> None:
    db, x, _ = make(tmp_path / "db", "fp16", pca=32)
    queries = DATA.sample(30, 16)[0]
    _, ref_pos = exact_topk(x, queries, 10)
    with db:
        got = db.search(queries, 10, nprobe=db.index_spec.params["nlist"], rerank=400)
        assert db.stats()["code_bytes_per_entry"] == 32 // 8 + 8
    assert recall(got.ids, ref_pos) >= 0.95


def test_damaged_store_segment_is_named(tmp_path: Path) -> None:
    path = tmp_path / "db"
    db, _, _ = make(path, "sq8")
    db.close()
    segment = sorted(path.glob("store.*.npy"))[0]
    data = bytearray(segment.read_bytes())
    data[-5] ^= 0xFF
    segment.write_bytes(bytes(data))
    with pytest.raises(DatabaseCorruptError, match=segment.name):
        Database.open(path, read_only=True)


@pytest.mark.parametrize(
    "storage, params, match",
    [
        ("fp32", None, "sq8 or fp16"),
        (None, {"store": "cloud"}, "store must be"),
        (None, {"rerank": -1}, "rerank must be"),
        (None, {"pca": DIM + 1}, "pca"),
        (None, {"coarse": "ivf"}, "coarse must be"),
    ],
)
def test_bad_parameters_are_refused_by_name(tmp_path: Path, storage, params, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        Database.create(tmp_path / "db", DIM, index="ivf-rabitq", storage=storage, index_params=params)
    assert not (tmp_path / "db").exists()


def test_search_refuses_a_negative_rerank(tmp_path: Path) -> None:
    db, _, _ = make(tmp_path / "db")
    with db, pytest.raises(InvalidInputError, match="rerank"):
        db.search(np.ones((1, DIM), np.float32), 3, rerank=-2)


def test_convert_keeps_ids_classes_provenance_and_answers(tmp_path: Path) -> None:
    """A flat fp32 database rebuilt as ivf-rabitq: the same entries, vocabulary (class ids too)
    and provenance; with every list probed and every candidate re-scored, the answers are the
    source's (its own exact search)."""
    x, labels = DATA.sample(N, 1)
    src = tmp_path / "src"
    with Database.create(src, DIM, storage="fp32") as db:
        db.add(x[:1000], [f"c{c}" for c in labels[:1000]], sources="first.png")
        db.add(x[1000:], [f"c{c}" for c in labels[1000:]], sources=[f"img{i % 9}.png" for i in range(N - 1000)])
        db.remove_entries(np.arange(200, 260))  # a gap in the ids
        db.remove_class(f"c{labels[0]}")  # a gap in the class ids
        entries, vocabulary = db.entries(), db.vocabulary
        queries = DATA.sample(20, 30)[0]
        reference = db.search(queries, 10)
    with Database.convert(src, tmp_path / "dst", index="ivf-rabitq", storage="fp16", train_size=1500) as dst:
        assert dst.entries() == entries
        assert dst.vocabulary == vocabulary
        got = dst.search(queries, 10, nprobe=dst.index_spec.params["nlist"], rerank=N)
        assert dst.index_spec.params["nlist"] == 1500 // 39, "trained on the sample asked for"
    np.testing.assert_allclose(got.sims, reference.sims, atol=2e-3)
    assert recall(got.ids, reference.ids) >= 0.98
    with Database.open(tmp_path / "dst", read_only=True) as reopened:
        assert reopened.entries() == entries


def test_convert_refuses_a_source_without_vectors_and_leaves_nothing(tmp_path: Path) -> None:
    x, labels = DATA.sample(600, 1)
    with Database.create(tmp_path / "src", DIM, index="ivf-pq", index_params={"m": 8, "nbits": 4}) as db:
        db.train(x)
        db.add(x, [f"c{c}" for c in labels])
    with pytest.raises(InvalidInputError, match="keeps no vectors"):
        Database.convert(tmp_path / "src", tmp_path / "dst", index="ivf-rabitq")
    assert not (tmp_path / "dst").exists()


def test_faiss_gpu_is_refused_by_name() -> None:
    """faiss-gpu has no RaBitQ index: a GPU mirror of one is refused before anything moves."""
    from knnclip.engine.database.gpu import faiss_gpu_problems
    from knnclip.engine.database.indexes import IndexSpec

    assert any("RaBitQ" in p for p in faiss_gpu_problems(IndexSpec.make("ivf-rabitq", None, None, DIM)))
