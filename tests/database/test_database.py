"""knnclip.engine.Database: the API, each index type, and zero forgetting, on real FAISS indexes and files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knnclip.engine import Database
from knnclip.engine.errors import (
    DatabaseExistsError,
    DatabaseLockedError,
    DatabaseNotTrainedError,
    InvalidInputError,
    ReadOnlyDatabaseError,
    UnknownClassError,
)
from tests.support.db_helpers import clustered, exact_topk

DIM = 48


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "db"


def test_add_search_matches_float64_brute_force(path: Path) -> None:
    x, labels = clustered(600, DIM, classes=6, seed=1)
    queries, _ = clustered(40, DIM, classes=6, seed=2)
    with Database.create(path, DIM, storage="fp32") as db:
        ids = db.add(x, [f"class{c}" for c in labels])
        assert ids.tolist() == list(range(600))
        sims, got_labels, got_ids = db.search(queries, k=7)
    ref_sims, ref_pos = exact_topk(x, queries, 7)
    np.testing.assert_allclose(sims, ref_sims, atol=2e-6)
    # Ties could legitimately swap ids; require equality where the reference has a clear gap.
    gap = np.abs(np.diff(ref_sims, axis=1)).min(axis=1) > 1e-5
    np.testing.assert_array_equal(got_ids[gap], ref_pos[gap])
    names = {
        info.id: int(info.name.removeprefix("class"))
        for info in Database.open(path, read_only=True).vocabulary.values()
    }
    np.testing.assert_array_equal(np.vectorize(names.get)(got_labels), labels[got_ids])


def test_fp16_storage_equals_search_over_fp16_rounded_vectors(path: Path) -> None:
    x, labels = clustered(300, DIM, classes=3, seed=3)
    q, _ = clustered(20, DIM, classes=3, seed=4)
    with Database.create(path, DIM, storage="fp16") as db:
        db.add(x, labels.astype(str))
        sims, _, ids = db.search(q, k=5)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    stored = unit.astype(np.float16).astype(np.float64)
    qn = q.astype(np.float64) / np.linalg.norm(q, axis=1, keepdims=True)
    np.testing.assert_allclose(sims, np.take_along_axis(qn @ stored.T, ids, axis=1), atol=1e-5)


def test_missing_neighbours_empty_database_and_zero_queries(path: Path) -> None:
    with Database.create(path, 4) as db:
        empty = db.search(np.ones((2, 4)), k=3)
        assert (empty.labels == -1).all() and (empty.ids == -1).all() and np.isneginf(empty.sims).all()
        db.add(np.eye(4)[:2], ["a", "b"])
        sims, labels, ids = db.search(np.array([[1.0, 0, 0, 0], [0, 0, 0, 0]]), k=3)
    assert labels[0].tolist() == [0, 1, -1] and ids[0].tolist() == [0, 1, -1]
    assert sims[0, 0] == pytest.approx(1.0) and np.isneginf(sims[0, 2])
    assert (labels[1] == -1).all(), "a zero query (empty mask) has no cosine neighbours"


@pytest.mark.parametrize(("index", "storage"), [("flat", "fp32"), ("flat", "fp16"), ("flat", "sq8"), ("hnsw", "fp32")])
def test_zero_queries_among_others_change_nothing(tmp_path: Path, index: str, storage: str) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    with Database.create(tmp_path / "db", 16, index=index, storage=storage) as db:
        if db.index_spec.needs_training:
            db.train(x)
        db.add(x, [f"c{i}" for i in rng.integers(0, 5, 300)])
        q = rng.standard_normal((6, 16)).astype(np.float32)
        alone = db.search(q, k=4)
        mixed = np.zeros((9, 16), np.float32)
        mixed[[0, 2, 3, 5, 7, 8]] = q
        got = db.search(mixed, k=4)
    np.testing.assert_array_equal(got.ids[[0, 2, 3, 5, 7, 8]], alone.ids)
    np.testing.assert_array_equal(got.sims[[0, 2, 3, 5, 7, 8]], alone.sims)
    assert (got.labels[[1, 4, 6]] == -1).all() and np.isneginf(got.sims[[1, 4, 6]]).all()


def test_vocabulary_names_synonyms_and_ids(path: Path) -> None:
    with Database.create(path, 4) as db:
        db.add(np.eye(4)[:3], ["wall,walls,brick wall", "cat", "walls"])
        vocab = db.vocabulary
        wall = vocab.find("brick wall")
        assert wall is not None and (wall.name, wall.synonyms, wall.id) == ("wall", ("walls", "brick wall"), 0)
        assert db.classes == {"wall": 2, "cat": 1}
        db.add(np.eye(4)[3:], np.array([1]))  # existing class id
        assert db.classes["cat"] == 2
        with pytest.raises(UnknownClassError, match=r"class ids \[7\]"):
            db.add(np.eye(4)[:1], np.array([7]))
        with pytest.raises(InvalidInputError, match="already names class 'wall'"):
            db.add_class("dog", ["walls"])
        dog = db.add_class("dog", ["puppy"])
        assert db.vocabulary.find("puppy") == dog and db.classes["dog"] == 0
        assert db.remove_class("cat") == 2
        assert "cat" not in db.classes
        assert db.add(np.eye(4)[:1], ["cat"]).tolist() == [4]
        assert db.vocabulary.find("cat").id == 3, "a removed class id is never handed out again"
        with pytest.raises(UnknownClassError, match="no class named 'horse'"):
            db.remove_class("horse")


def test_thing_flag_survives_replay_and_checkpoint(path: Path) -> None:
    with Database.create(path, 4) as db:
        db.add_class("cat", thing=True)
        db.add(np.eye(4)[:2], ["cat", "sky"])
        assert db.vocabulary.find("cat").thing and not db.vocabulary.find("sky").thing
        db.add_class("cat", ["kitty"])  # thing not given: kept
        assert db.vocabulary.find("kitty").thing
    with Database.open(path, read_only=True) as db:  # from the log
        assert db.vocabulary.find("cat").thing and not db.vocabulary.find("sky").thing
    with Database.open(path) as db:
        db.add_class("sky", thing=False)
        db.checkpoint()
    with Database.open(path, read_only=True) as db:  # from the manifest
        assert db.vocabulary.find("cat").thing and db.vocabulary.find("cat").synonyms == ("kitty",)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda db: db.add(np.ones((2, 5)), ["a", "b"]), InvalidInputError, r"shape \[N, 4\]"),
        (lambda db: db.add(np.ones(4), ["a"]), InvalidInputError, r"shape \[N, 4\]"),
        (lambda db: db.add(np.ones((2, 4), np.int32), ["a", "b"]), InvalidInputError, "float array"),
        (lambda db: db.add(np.array([[1, np.nan, 0, 0]]), ["a"]), InvalidInputError, "NaN or Inf"),
        (lambda db: db.add(np.array([[1, np.inf, 0, 0]]), ["a"]), InvalidInputError, "NaN or Inf"),
        (lambda db: db.add(np.array([[1e300, 0, 0, 0]]), ["a"]), InvalidInputError, "overflow float32"),
        (lambda db: db.add(np.zeros((1, 4)), ["a"]), InvalidInputError, "zero vectors"),
        (lambda db: db.add(np.ones((2, 4)), ["a"]), InvalidInputError, "one per embedding"),
        (lambda db: db.add(np.ones((2, 4)), "ab"), InvalidInputError, "not a single string"),
        (lambda db: db.add(np.ones((1, 4)), [3.5]), InvalidInputError, "class names"),
        (lambda db: db.add(np.ones((1, 4)), [" , x"]), InvalidInputError, "empty class name"),
        (lambda db: db.add(np.ones((1, 4)), ["x" * 900_000]), InvalidInputError, "at most 256 characters"),
        (lambda db: db.add_class("e", ["y" * 2_000_000]), InvalidInputError, "at most 256 characters"),
        (lambda db: db.add_class("e", [f"s{i}" for i in range(64)]), InvalidInputError, "at most 64 names"),
        (lambda db: db.remove_class("a,nonexistent"), InvalidInputError, "one class name"),
        (lambda db: db.search(np.ones((1, 4)), 0), InvalidInputError, "k must be"),
        (lambda db: db.search(np.ones((1, 4)), True), InvalidInputError, "k must be"),
        (lambda db: db.search(np.ones((1, 4)), 2.0), InvalidInputError, "k must be"),
        (lambda db: db.search(np.ones((1, 3)), 2), InvalidInputError, r"queries must have shape \[N, 4\]"),
        (lambda db: db.search(np.full((1, 4), np.nan), 2), InvalidInputError, "NaN"),
    ],
)
def test_bad_input_is_a_clear_error_and_changes_nothing(path: Path, call, error, match) -> None:
    with Database.create(path, 4) as db:
        db.add(np.eye(4), ["a", "b", "c", "d"])
        before = db.stats()["lsn"], db.classes
        with pytest.raises(error, match=match):
            call(db)
        assert (db.stats()["lsn"], db.classes) == before


def test_create_and_open_errors(path: Path, tmp_path: Path) -> None:
    Database.create(path, 4).close()
    with pytest.raises(DatabaseExistsError, match="already exists"):
        Database.create(path, 4)
    with pytest.raises(FileNotFoundError, match="no such database"):
        Database.open(tmp_path / "nothing")
    for kwargs, match in [
        ({"metric": "l1"}, "metric must be"),
        ({"index": "lsh"}, "index must be"),
        ({"storage": "int4"}, "storage must be"),
        ({"index": "ivf-pq", "storage": "fp16"}, "leave storage unset"),
        ({"index": "hnsw", "index_params": {"nlist": 3}}, "unknown parameters"),
        ({"index": "ivf-pq", "index_params": {"m": 5}}, "must divide"),
        ({"index": "hnsw", "index_params": {"M": 0}}, "positive integer"),
    ]:
        with pytest.raises(InvalidInputError, match=match):
            Database.create(tmp_path / "other", 4, **kwargs)
        assert not (tmp_path / "other").exists(), "a failed create leaves nothing behind"
    with pytest.raises(InvalidInputError, match="device must be"):
        Database.open(path, device="tpu")


def test_one_writer_many_readers(path: Path) -> None:
    writer = Database.create(path, 4)
    writer.add(np.eye(4)[:2], ["a", "b"])
    with pytest.raises(DatabaseLockedError, match="another writer"):
        Database.open(path)
    with Database.open(path, read_only=True) as reader:
        assert len(reader) == 2, "a reader sees every add that returned (replayed from the log)"
        with pytest.raises(ReadOnlyDatabaseError, match="read_only=True"):
            reader.add(np.eye(4)[:1], ["c"])
        with pytest.raises(ReadOnlyDatabaseError):
            reader.remove_class("a")
    writer.close()
    with pytest.raises(ReadOnlyDatabaseError, match="closed"):
        writer.search(np.eye(4), 1)
    Database.open(path).close()  # the lock was released


def test_reopen_replays_log_and_checkpoint_and_snapshot_agree(path: Path, tmp_path: Path) -> None:
    x, labels = clustered(200, DIM, classes=4, seed=5)
    q, _ = clustered(30, DIM, classes=4, seed=6)
    db = Database.create(path, DIM)
    db.add(x[:100], labels[:100].astype(str))
    db.add(x[100:], labels[100:].astype(str))
    db.remove_class("2")
    expected = db.search(q, 5)
    db.snapshot(tmp_path / "snap")
    with Database.open(path, read_only=True) as replayed:
        assert replayed.stats()["checkpoint_lsn"] == 0 and replayed.stats()["lsn"] == 3
        for a, b in zip(replayed.search(q, 5), expected, strict=True):
            np.testing.assert_array_equal(a, b)
    db.checkpoint()
    db.close()
    for other in (path, tmp_path / "snap"):
        with Database.open(other) as reopened:
            for a, b in zip(reopened.search(q, 5), expected, strict=True):
                np.testing.assert_array_equal(a, b)
            assert reopened.classes == {
                "0": int((labels == 0).sum()),
                "1": int((labels == 1).sum()),
                "3": int((labels == 3).sum()),
            }
    assert (
        Database.open(tmp_path / "snap", read_only=True).stats()["uuid"]
        != Database.open(path, read_only=True).stats()["uuid"]
    )
    with pytest.raises(DatabaseExistsError):
        Database.open(path, read_only=True).snapshot(tmp_path / "snap")


def test_training_is_required_where_the_index_needs_it(path: Path) -> None:
    x, labels = clustered(2000, DIM, classes=8, seed=7)
    with Database.create(path, DIM, index="ivf-flat") as db:
        with pytest.raises(DatabaseNotTrainedError, match=r"db.train\(samples\)"):
            db.add(x[:5], ["a"] * 5)
        with pytest.raises(InvalidInputError, match="needs >= 50 vectors"):
            Database.create(path.with_name("b"), DIM, index="ivf-flat", index_params={"nlist": 50}).train(x[:10])
        db.train(x)
        assert db.is_trained and db.index_spec.params["nlist"] == min(int(4 * np.sqrt(2000)), 2000 // 39)
        db.add(x, labels.astype(str))
        with pytest.raises(InvalidInputError, match="empty database"):
            db.train(x)
    with Database.open(path, read_only=True) as db:
        assert db.is_trained and len(db) == 2000


APPROXIMATE = [
    ("ivf-flat", "fp16", 0.95),
    ("ivf-flat", "sq8", 0.9),
    ("ivf-pq", None, 0.5),  # 8 B codes for 64-d vectors: PQ trades recall for size
    ("hnsw", "fp16", 0.95),
    ("hnsw", "sq8", 0.9),
]


@pytest.mark.parametrize(("kind", "storage", "min_recall"), APPROXIMATE)
def test_approximate_index_recall_against_exact(
    tmp_path: Path, kind: str, storage: str | None, min_recall: float
) -> None:
    # Small-scale check of every index type; the 100k x 1536 figures are in benchmarks/database.py.
    x, labels = clustered(8000, 64, classes=40, seed=8)
    q, _ = clustered(100, 64, classes=40, seed=9)
    _, truth = exact_topk(x, q, 10)
    with Database.create(tmp_path / "db", 64, index=kind, storage=storage) as db:
        if db.index_spec.needs_training:
            db.train(x)
        db.add(x, labels.astype(str))
        _, _, ids = db.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), truth.tolist(), strict=True)])
    assert recall >= min_recall, f"{kind}/{storage}: recall@10 {recall:.3f}"


@pytest.mark.parametrize(("storage", "min_agreement"), [("fp16", 0.995), ("sq8", 0.98)])
def test_compressed_storage_agrees_with_fp32_top1(tmp_path: Path, storage: str, min_agreement: float) -> None:
    x, labels = clustered(4000, DIM, classes=20, seed=10)
    q, _ = clustered(300, DIM, classes=20, seed=11)
    results = {}
    for s in ("fp32", storage):
        with Database.create(tmp_path / s, DIM, storage=s) as db:
            if db.index_spec.needs_training:
                db.train(x)
            db.add(x, labels.astype(str))
            results[s] = db.search(q, 1).labels[:, 0]
    agreement = np.mean(results["fp32"] == results[storage])
    assert agreement >= min_agreement, f"{storage}: top-1 label agreement with fp32 {agreement:.3f}"


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 2**31),
    st.integers(1, 60),
    st.integers(1, 60),
    st.sampled_from(["fp32", "fp16", "sq8"]),
)
def test_adding_a_class_never_changes_another(tmp_path_factory, seed: int, n_a: int, n_b: int, storage: str) -> None:
    rng = np.random.default_rng(seed)
    dim = 16
    a = rng.normal(size=(n_a, dim)).astype(np.float32)
    b = rng.normal(size=(n_b, dim)).astype(np.float32)
    q = rng.normal(size=(30, dim)).astype(np.float32)
    k = int(rng.integers(1, n_a + 1))
    with Database.create(tmp_path_factory.mktemp("zf") / "db", dim, storage=storage) as db:
        if db.index_spec.needs_training:
            db.train(rng.normal(size=(200, dim)).astype(np.float32))
        ids_a = db.add(a, ["A"] * n_a)
        vec_before, entries_before = db.vectors(ids_a), db.ids_and_labels()
        before = db.search(q, k)
        db.add(b, ["B"] * n_b)
        np.testing.assert_array_equal(db.vectors(ids_a), vec_before)
        ids_after, labels_after = db.ids_and_labels()
        np.testing.assert_array_equal(ids_after[:n_a], entries_before[0])
        np.testing.assert_array_equal(labels_after[:n_a], entries_before[1])
        after = db.search(q, k)
    only_a = (after.labels == db.vocabulary.find("A").id).all(axis=1)
    for x, y in zip(before, after, strict=True):
        np.testing.assert_array_equal(x[only_a], y[only_a])


def test_removing_a_class_never_changes_another(path: Path) -> None:
    x, labels = clustered(500, DIM, classes=5, seed=12)
    q, _ = clustered(50, DIM, classes=5, seed=13)
    with Database.create(path, DIM) as db:
        ids = db.add(x, labels.astype(str))
        keep = labels != 3
        before_vectors = db.vectors(ids[keep])
        before = db.search(q, 8)
        db.remove_class("3")
        np.testing.assert_array_equal(db.vectors(ids[keep]), before_vectors)
        after = db.search(q, 8)
        unaffected = ~(before.labels == 3).any(axis=1)
        for x_, y_ in zip(before, after, strict=True):
            np.testing.assert_array_equal(x_[unaffected], y_[unaffected])
        assert not (after.labels == 3).any()


def test_stats_report_bytes_per_entry(path: Path) -> None:
    with Database.create(path, 1536, storage="fp32") as db:
        db.add(np.random.default_rng(0).normal(size=(50, 1536)), ["a"] * 50)
        db.checkpoint()
        s = db.stats()
    assert s["code_bytes_per_entry"] == 6144, "the paper's 6 kB per fp32 1536-d entry"
    assert s["entries"] == 50 and s["index"] == "flat" and s["storage"] == "fp32"
    assert 6144 < s["disk_bytes_per_entry"] < 6144 * 1.2


@pytest.mark.parametrize("storage", ["fp16", "sq8"])
@pytest.mark.parametrize("k", [1, 10, 5000])
def test_blas_scan_of_compressed_codes_equals_faiss_scan(storage: str, k: int) -> None:
    """The flat fp16/sq8 search decodes codes in blocks; FAISS's own per-vector scan is the reference."""
    import faiss

    from knnclip.engine.database import flat_scan
    from knnclip.engine.database.indexes import IndexSpec, build_index

    x, _ = clustered(flat_scan.BLOCK_ROWS * 2 + 37, 40, classes=10, seed=14)  # a partial last block
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q, _ = clustered(25, 40, classes=10, seed=15)
    index = build_index(IndexSpec.make("flat", storage, None, 40), 40, "cosine")
    if not index.is_trained:
        index.train(x)
    index.add(x)
    sims, pos = flat_scan.scan(index, storage, q, k)
    ref_sims, ref_pos = faiss.IndexScalarQuantizer.search(index, q, k)
    np.testing.assert_allclose(sims, ref_sims, atol=2e-6)
    clear = np.abs(np.diff(ref_sims, axis=1)).min(axis=1) > 1e-5 if k > 1 else np.ones(len(q), bool)
    np.testing.assert_array_equal(pos[clear], ref_pos[clear])
    assert (pos >= 0).all() and len(np.unique(pos[0])) == k


def test_docstring_examples_run() -> None:
    import doctest

    import knnclip.engine.database.database as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def _faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


@pytest.mark.skipif(_faiss_gpus() > 0, reason="faiss-gpu and a GPU are present")
def test_cuda_without_faiss_gpu_is_a_clear_error(path: Path) -> None:
    from knnclip.engine.errors import BackendUnavailableError

    Database.create(path, 8).close()
    with pytest.raises(BackendUnavailableError, match="faiss with GPU support"):
        Database.open(path, device="cuda")
    Database.open(path).close()  # the failed open released the writer lock


@pytest.mark.gpu
@pytest.mark.skipif(_faiss_gpus() == 0, reason="needs faiss-gpu and a CUDA device")
@pytest.mark.parametrize(("kind", "storage"), [("flat", "fp32"), ("flat", "fp16"), ("ivf-flat", "fp16")])
def test_gpu_search_agrees_with_cpu(tmp_path: Path, kind: str, storage: str) -> None:
    x, labels = clustered(3000, DIM, classes=10, seed=16)
    q, _ = clustered(50, DIM, classes=10, seed=17)
    with Database.create(tmp_path / "db", DIM, index=kind, storage=storage) as db:
        if db.index_spec.needs_training:
            db.train(x)
        db.add(x[:2000], labels[:2000].astype(str))
    with Database.open(tmp_path / "db", device="cuda") as gpu:
        gpu.add(x[2000:], labels[2000:].astype(str))  # queued appends reach the GPU before the search
        gpu.remove_class("3")  # rebuilds the GPU copy
        got = gpu.search(q, 5)
    with Database.open(tmp_path / "db", read_only=True) as cpu:
        ref = cpu.search(q, 5)
    np.testing.assert_allclose(got.sims, ref.sims, atol=2e-3)  # fp16 on the GPU, sq/fp32 on the CPU
    assert np.mean(got.labels == ref.labels) > 0.98 and not (got.labels == 3).any()
