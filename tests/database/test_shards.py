"""A database split into shards by entry id and searched by one worker per shard (threads here,
Ray actors on loopback in the slow test): the merged answers are the unsharded database's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from knnclip.engine import Database
from knnclip.engine.bench.embeddings import EmbeddingGenerator
from knnclip.engine.database.database import SearchResult
from knnclip.engine.database.shards import ShardedDatabase, merge_top_k, split_database
from knnclip.engine.errors import DatabaseCorruptError, InvalidInputError

DIM = 48
DATA = EmbeddingGenerator(dim=DIM, classes=30, rank=DIM, chunk=1024)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("shards") / "db"
    x, y = DATA.sample(3000, 1)
    with Database.create(path, DIM, storage="fp32") as db:
        db.add(x, [f"c{v}" for v in y], sources=[f"img{i % 11}.png" for i in range(len(x))])
        db.remove_entries(np.arange(100, 140))
    return path


def test_merged_answers_are_the_unsharded_answers(source: Path, tmp_path: Path) -> None:
    paths = split_database(source, tmp_path / "sharded", 3)
    assert [p.name for p in paths] == ["shard-0", "shard-1", "shard-2"]
    queries = DATA.sample(64, 7)[0]
    with Database.open(source, read_only=True) as db:
        reference, classes, entries = db.search(queries, 10), db.classes, db.entries()
        vocabulary = db.vocabulary
    for i, path in enumerate(paths):
        with Database.open(path, read_only=True) as shard:
            ids, _ = shard.ids_and_labels()
            assert (ids % 3 == i).all() and shard.vocabulary == vocabulary
    with ShardedDatabase(tmp_path / "sharded") as sharded:
        got = sharded.search(queries, 10)
        assert sharded.classes == classes and len(sharded) == len(entries)
        assert sharded.vocabulary == vocabulary
        wide = sharded.search(queries, 3000)  # more than any shard holds: the rest is missing
    np.testing.assert_array_equal(got.ids, reference.ids)
    np.testing.assert_array_equal(got.labels, reference.labels)
    np.testing.assert_array_equal(got.sims, reference.sims)
    assert (wide.ids[:, len(entries) :] == -1).all() and np.isneginf(wide.sims[:, len(entries) :]).all()


def test_merge_against_a_numpy_reference() -> None:
    """The best k of the parts' rows, ties to the lower id, missing neighbours last."""
    rng = np.random.default_rng(3)
    parts = []
    for part in range(3):
        sims = np.sort(rng.choice([0.1, 0.2, 0.3, 0.5], size=(5, 4)), axis=1)[:, ::-1].astype(np.float32)
        ids = rng.permutation(40)[:20].reshape(5, 4) * 3 + part
        sims[0, 2:], ids[0, 2:] = -np.inf, -1  # this part has only two neighbours for row 0
        parts.append(SearchResult(sims, ids % 7, ids))
    merged = merge_top_k(parts, 6)
    for row in range(5):
        pool = [
            (-float(p.sims[row, j]), int(p.ids[row, j]) if p.ids[row, j] >= 0 else 1 << 62, p, j)
            for p in parts
            for j in range(4)
        ]
        best = sorted(pool, key=lambda t: (t[0], t[1]))[:6]
        assert merged.ids[row].tolist() == [int(t[2].ids[row, t[3]]) for t in best]
        assert merged.sims[row].tolist() == [float(t[2].sims[row, t[3]]) for t in best]


def test_shards_follow_their_writers(source: Path, tmp_path: Path) -> None:
    paths = split_database(source, tmp_path / "sharded", 2)
    with ShardedDatabase(tmp_path / "sharded") as sharded:
        before = len(sharded)
        with Database.open(paths[1]) as writer:
            writer.add(np.ones((3, DIM)), ["new"] * 3)
        result = sharded.follow()
        assert result.records == 1 and not result.reloaded
        assert len(sharded) == before + 3 and sharded.classes["new"] == 3
        top = sharded.search(np.ones((1, DIM)), 3)
        assert (top.labels[0] == sharded.vocabulary.find("new").id).all()


def test_the_segmenter_searches_shards_as_one_database(source: Path, tmp_path: Path, demo_models: Path) -> None:
    """One segmenter over the unsharded database, one over its shards: the same segments."""
    from knnclip.engine.demo.run import build_database
    from knnclip.engine.demo.synthetic import make_split
    from knnclip.engine.pipeline.segmenter import Segmenter

    split = make_split(4, seed=1, size=(96, 128))
    db_path = build_database(demo_models, tmp_path / "db", split)
    split_database(db_path, tmp_path / "sharded", 3)
    images = [np.asarray(s.image) for s in make_split(2, seed=9, size=(96, 128))]
    with Segmenter.from_dir(demo_models, db_path, read_only=True) as whole:
        expected = whole.segment_batch(images)
        with ShardedDatabase(tmp_path / "sharded") as sharded:
            over_shards = whole.with_database(sharded)  # type: ignore[arg-type]
            got = over_shards.segment_batch(images)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a.semantic, b.semantic)
        np.testing.assert_array_equal(a.panoptic, b.panoptic)
        assert a.classes == b.classes


def test_bad_shard_lists_and_counts_are_refused(source: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="shards must be"):
        split_database(source, tmp_path / "none", 0)
    assert not (tmp_path / "none").exists()
    split_database(source, tmp_path / "sharded", 2)
    listing = tmp_path / "sharded" / "shards.json"
    listing.write_text(json.dumps({"format": 1, "shards": ["shard-0", "../../etc"]}))
    with pytest.raises(DatabaseCorruptError, match="shard-<i>"):
        ShardedDatabase(tmp_path / "sharded")
    listing.write_text("{not json")
    with pytest.raises(DatabaseCorruptError, match="unreadable"):
        ShardedDatabase(tmp_path / "sharded")


@pytest.mark.slow
def test_three_ray_actors_answer_as_the_unsharded_database(source: Path, tmp_path: Path) -> None:
    """Each shard in its own Ray actor on a local instance bound to 127.0.0.1."""
    ray = pytest.importorskip("ray", reason="the Ray actors need the ray extra (pip install 'knnclip[ray]')")
    split_database(source, tmp_path / "sharded", 3)
    queries = DATA.sample(32, 8)[0]
    with Database.open(source, read_only=True) as db:
        reference = db.search(queries, 10)
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False)
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    try:
        with ShardedDatabase(tmp_path / "sharded", workers="ray") as sharded:
            assert sharded.shards == 3
            got = sharded.search(queries, 10)
            assert sharded.stats()["entries"] == 3000 - 40
    finally:
        ray.shutdown()
    np.testing.assert_array_equal(got.ids, reference.ids)
    np.testing.assert_array_equal(got.sims, reference.sims)
