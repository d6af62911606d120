"""bf16 search of a flat database (OpenVINO) against the fp32 search: the nearest neighbour's class
and recall@k on clustered data, appends and removals seen, the database's files untouched."""

from __future__ import annotations

import numpy as np
import openvino as ov
import pytest

if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
    pytest.skip("this CPU has no bfloat16 arithmetic", allow_module_level=True)

from knnclip.engine import Database
from knnclip.engine.errors import BackendUnavailableError, InvalidInputError

DIM = 256


def clustered(n: int, seed: int, classes: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((classes, DIM))
    labels = rng.integers(0, classes, n)
    x = centres[labels] + 0.8 * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


@pytest.fixture
def db_path(tmp_path):
    path = tmp_path / "db"
    with Database.create(path, DIM, index="flat", storage="fp32") as db:
        x, labels = clustered(20_000, 1)
        db.add(x, [f"c{i}" for i in labels])
    return path


def test_bf16_agrees_with_fp32_on_the_nearest_class_and_recalls_the_neighbours(db_path):
    queries, _ = clustered(500, 2)
    with Database.open(db_path, read_only=True) as exact, Database.open(db_path, read_only=True, search="bf16") as fast:
        want, got = exact.search(queries, 10), fast.search(queries, 10)
        assert fast.stats()["search"] == "Bf16SearchMirror"
    top1 = float(np.mean(want.labels[:, 0] == got.labels[:, 0]))
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(want.ids, got.ids, strict=True)])
    assert top1 >= 0.99 and recall >= 0.9, (top1, recall)
    np.testing.assert_allclose(got.sims, want.sims, atol=2e-2)


def test_appends_and_removals_reach_the_bf16_search(db_path):
    with Database.open(db_path, search="bf16") as db:
        probe = clustered(1, 7)[0]
        db.add(probe, ["newcomer"])
        assert db.search(probe, 1).labels[0, 0] == db.vocabulary.find("newcomer").id
        db.remove_class("newcomer")
        assert db.search(probe, 1).labels[0, 0] != -1 and "newcomer" not in db.classes
    with Database.open(db_path, read_only=True) as reopened:  # what is stored is the faiss index, as before
        assert len(reopened) == 20_000


def test_bf16_search_is_for_flat_cpu_databases(tmp_path, db_path):
    with pytest.raises(InvalidInputError, match="bf16"):
        Database.open(db_path, search="bf16", device="cuda")
    Database.create(tmp_path / "hnsw", 8, index="hnsw").close()
    with pytest.raises(BackendUnavailableError, match="flat"):
        Database.open(tmp_path / "hnsw", search="bf16")
