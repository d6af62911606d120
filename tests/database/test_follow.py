"""Database.follow: a read-only handle applies what its writer logs, in place, reading only the
change; checkpoints do not make it reload; falling behind the log makes it load the latest
checkpoint whole. Real files, a real writer, and a fresh open as the reference."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from knnclip.engine import Database
from knnclip.engine.errors import InvalidInputError
from tests.support.db_helpers import clustered

DIM = 24


def same_state(follower: Database, path: Path) -> None:
    """The follower holds what a handle opened now holds: entries, classes, provenance, search."""
    queries = clustered(12, DIM, classes=4, seed=99)[0]
    with Database.open(path, read_only=True) as fresh:
        for a, b in zip(follower.ids_and_labels(), fresh.ids_and_labels(), strict=True):
            np.testing.assert_array_equal(a, b)
        assert follower.vocabulary == fresh.vocabulary
        assert follower.entries() == fresh.entries()
        assert follower.lsn == fresh.lsn
        mine, theirs = follower.search(queries, 5), fresh.search(queries, 5)
        np.testing.assert_array_equal(mine.ids, theirs.ids)
        np.testing.assert_array_equal(mine.sims, theirs.sims)


@pytest.fixture
def pair(tmp_path: Path):
    path = tmp_path / "db"
    writer = Database.create(path, DIM)
    x, y = clustered(300, DIM, classes=4, seed=1)
    writer.add(x, [f"c{v}" for v in y], sources="first.png")
    follower = Database.open(path, read_only=True)
    yield path, writer, follower
    follower.close()
    writer.close()


def test_every_kind_of_change_is_followed_in_place(pair) -> None:
    path, writer, follower = pair
    rng = np.random.default_rng(2)
    steps = [
        lambda: writer.add(rng.normal(size=(5, DIM)), ["new"] * 5, sources="second.png"),
        lambda: writer.add_class("wall", ["walls"], thing=False),
        lambda: writer.rename_class("new", "renamed"),
        lambda: writer.merge_classes("renamed", "c1"),
        lambda: writer.remove_entries([3, 4, 5]),
        lambda: writer.remove_source("second.png"),
        lambda: writer.remove_class("c2"),
    ]
    for step in steps:
        step()
        result = follower.follow()
        assert result.records == 1 and not result.reloaded and result.lsn == writer.lsn
        same_state(follower, path)
    assert follower.follow().records == 0, "nothing new: nothing applied"


def test_the_cost_of_following_is_the_change_not_the_database(pair) -> None:
    path, writer, follower = pair
    writer.checkpoint()
    follower.follow()
    writer.add(np.ones((1, DIM)), ["one"])
    result = follower.follow()
    record_bytes = (path / "wal.log").stat().st_size - 32
    assert result.records == 1 and result.bytes_read == record_bytes, result
    assert result.bytes_read < DIM * 4 + 1024, "one entry's record, not the database"


def test_a_checkpoint_does_not_make_the_follower_reload(pair) -> None:
    path, writer, follower = pair
    writer.add(np.ones((2, DIM)), ["before"] * 2)
    writer.checkpoint()  # the log the follower reads is replaced: its last record is still read
    writer.add(np.full((3, DIM), 2.0), ["after"] * 3)
    result = follower.follow()
    assert result.records == 2 and not result.reloaded
    same_state(follower, path)
    writer.checkpoint()
    assert follower.follow().records == 0 and not follower.follow().reloaded
    writer.add(np.full((1, DIM), 3.0), ["later"])
    assert follower.follow().records == 1
    same_state(follower, path)


def test_a_follower_behind_two_checkpoints_loads_the_latest_whole(pair) -> None:
    path, writer, follower = pair
    follower.follow()  # the follower holds the log open from here
    writer.add(np.ones((2, DIM)), ["a"] * 2)
    writer.checkpoint()
    writer.add(np.full((2, DIM), 2.0), ["b"] * 2)
    writer.checkpoint()  # the log holding "b" is gone
    writer.add(np.full((2, DIM), 3.0), ["c"] * 2)
    result = follower.follow()
    assert result.reloaded and result.lsn == writer.lsn
    assert result.bytes_read >= sum(p.stat().st_size for p in path.glob("index.*.faiss"))
    same_state(follower, path)
    writer.add(np.full((1, DIM), 4.0), ["d"])
    assert follower.follow().records == 1, "after a reload it follows the log again"
    same_state(follower, path)


def test_a_replaced_database_is_loaded_whole(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with Database.create(path, DIM) as writer:
        writer.add(np.ones((2, DIM)), ["old"] * 2)
    with Database.open(path, read_only=True) as follower:
        follower.follow()
        shutil.rmtree(path)
        with Database.create(path, DIM) as writer:
            writer.add(np.full((3, DIM), 2.0), ["fresh"] * 3)
        assert follower.follow().reloaded
        assert follower.classes == {"fresh": 3}


def test_a_writer_does_not_follow(pair) -> None:
    _, writer, _ = pair
    with pytest.raises(InvalidInputError, match="read-only"):
        writer.follow()


def test_searches_during_following_see_whole_states(pair) -> None:
    """A search never sees half a change: each answer equals the answer of some logged state."""
    import threading

    path, writer, follower = pair
    query = clustered(1, DIM, classes=4, seed=7)[0]
    seen: list[tuple[int, ...]] = []
    stop = threading.Event()

    def search() -> None:
        while not stop.is_set():
            seen.append(tuple(follower.search(query, 3).ids[0].tolist()))

    thread = threading.Thread(target=search)
    thread.start()
    states = {tuple(follower.search(query, 3).ids[0].tolist())}
    try:
        for i in range(20):
            writer.add(query + 0.01 * i, [f"near{i}"])
            if i % 5 == 4:
                writer.checkpoint()
            follower.follow()
            states.add(tuple(follower.search(query, 3).ids[0].tolist()))
    finally:
        stop.set()
        thread.join()
    assert set(seen) <= states
