"""Editing the vocabulary without forgetting: remove single entries, rename a class, merge two
classes. On real databases on disk: every other entry and class is untouched (searches whose
neighbours are all untouched entries give the same results before and after, as the
zero-forgetting tests do), the change survives a reopen and a checkpoint, a writer killed with
SIGKILL at random moments loses no acknowledged change and leaves no half-applied one, and a
damaged record is refused."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from knnclip.engine import Database
from knnclip.engine.errors import DatabaseCorruptError, InvalidInputError, UnknownClassError, UnknownEntryError
from tests.support.db_helpers import CRASH_BATCH, CRASH_DIM, CURATION_STATES, clustered, crash_batch, curation_cycle

ROOT = Path(__file__).resolve().parents[2]
DIM = 16


@pytest.fixture(params=["flat", "ivf-flat", "hnsw"])
def db(request, tmp_path: Path):
    """Three classes of clustered vectors (30 entries each) in a database of each index kind."""
    x, labels = clustered(90, DIM, 3, seed=4)
    database = Database.create(tmp_path / "db", DIM, index=request.param)
    if request.param.startswith("ivf"):
        database.train(clustered(400, DIM, 3, seed=5)[0])
    database.add(x, [("cat", "dog", "bird")[c] for c in labels])
    yield database
    database.close()


def snapshot(db: Database, queries: np.ndarray, k: int = 5):
    result = db.search(queries, k)
    return result.sims.copy(), result.ids.copy(), db.vocabulary.copy()


def untouched_rows(before_ids: np.ndarray, gone: set[int]) -> np.ndarray:
    """The queries whose every neighbour is an entry the change did not touch."""
    return np.array([not (set(row.tolist()) & gone) for row in before_ids])


def test_removing_entries_touches_no_other_entry(db: Database, tmp_path: Path) -> None:
    queries = clustered(40, DIM, 3, seed=9)[0]
    sims, ids, _ = snapshot(db, queries)
    all_ids, labels = db.ids_and_labels()
    positional = db.index_spec.positional  # vectors() reads flat and hnsw indexes
    vectors, counts = (db.vectors(all_ids) if positional else None), db.classes
    gone = all_ids[labels == db.vocabulary.find("dog").id][:5]
    assert db.remove_entries(gone.tolist() + [int(gone[0])]) == 5  # a repeated id counts once
    assert db.classes == {**counts, "dog": counts["dog"] - 5}
    after = db.search(queries, 5)
    same = untouched_rows(ids, set(gone.tolist()))
    assert same.sum() >= 10
    np.testing.assert_array_equal(after.ids[same], ids[same])
    np.testing.assert_array_equal(after.sims[same], sims[same])
    assert not np.isin(after.ids, gone).any()
    remaining, _ = db.ids_and_labels()
    np.testing.assert_array_equal(remaining, all_ids[~np.isin(all_ids, gone)])
    if positional:
        np.testing.assert_array_equal(db.vectors(remaining), vectors[~np.isin(all_ids, gone)])  # byte for byte
    with pytest.raises(UnknownEntryError, match=r"no entries with ids 123456.*nothing was removed"):
        db.remove_entries([int(remaining[0]), 123456])
    assert len(db) == len(all_ids) - 5
    with pytest.raises(InvalidInputError, match="integers"):
        db.remove_entries(np.array([1.5]))
    path = db.path
    db.close(checkpoint=False)
    with Database.open(path, read_only=True) as replayed:  # from the log
        np.testing.assert_array_equal(replayed.search(queries, 5).ids, after.ids)
    with Database.open(path) as writer:
        writer.checkpoint()
    with Database.open(path, read_only=True) as checkpointed:
        np.testing.assert_array_equal(checkpointed.search(queries, 5).ids, after.ids)
        assert checkpointed.classes == {**counts, "dog": counts["dog"] - 5}


def test_rename_keeps_the_id_the_entries_and_the_other_names(db: Database) -> None:
    db.add_class("dog", ["hound", "puppy"])
    queries = clustered(20, DIM, 3, seed=9)[0]
    before, before_counts = db.search(queries, 5), db.classes
    dog = db.vocabulary.find("dog")
    renamed = db.rename_class("dog", "canine")
    assert (renamed.id, renamed.name, renamed.synonyms) == (dog.id, "canine", ("hound", "puppy"))
    assert db.vocabulary.find("dog") is None and db.vocabulary.find("puppy").id == dog.id
    assert db.classes["canine"] == before_counts["dog"] and "dog" not in db.classes
    after = db.search(queries, 5)
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_array_equal(after.labels, before.labels)  # class ids are kept
    assert db.rename_class("canine", "hound").synonyms == ("puppy",)  # a synonym becomes the name
    with pytest.raises(InvalidInputError, match="already names class 'cat'.*merge_classes"):
        db.rename_class("hound", "cat")
    with pytest.raises(InvalidInputError, match="one new name"):
        db.rename_class("hound", "a,b")
    with pytest.raises(UnknownClassError):
        db.rename_class("unicorn", "horse")
    path = db.path
    db.close(checkpoint=False)
    with Database.open(path, read_only=True) as again:
        assert again.vocabulary.find("hound").id == dog.id and again.vocabulary.find("canine") is None


def test_merge_moves_entries_and_names_and_touches_nothing_else(db: Database) -> None:
    db.add_class("dog", ["hound"])
    queries = clustered(30, DIM, 3, seed=9)[0]
    before = db.search(queries, 5)
    cat, dog, bird = (db.vocabulary.find(n) for n in ("cat", "dog", "bird"))
    counts = db.classes
    merged = db.merge_classes("dog", "cat")
    assert (merged.id, merged.name, merged.synonyms) == (cat.id, "cat", ("dog", "hound"))
    assert db.classes == {"cat": counts["cat"] + counts["dog"], "bird": counts["bird"]}
    assert db.vocabulary.find("hound").id == cat.id and dog.id not in db.vocabulary
    after = db.search(queries, 5)
    np.testing.assert_array_equal(after.ids, before.ids)  # the entries themselves are untouched
    np.testing.assert_array_equal(after.sims, before.sims)
    expected = np.where(before.labels == dog.id, cat.id, before.labels)
    np.testing.assert_array_equal(after.labels, expected)
    assert (after.labels[before.labels == bird.id] == bird.id).all()
    with pytest.raises(InvalidInputError, match="the same class"):
        db.merge_classes("hound", "cat")
    path = db.path
    db.close(checkpoint=False)
    for checkpoint in (False, True):
        with Database.open(path) as again:
            np.testing.assert_array_equal(again.search(queries, 5).labels, expected)
            if checkpoint:
                again.checkpoint()


def test_a_flipped_byte_in_a_curation_record_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with Database.create(path, CRASH_DIM) as db:
        db.auto_checkpoint_bytes = 1 << 30  # keep every record in the log
        assert list(curation_cycle(db, 0)) == [s[0] for s in CURATION_STATES[1:]]
        db_path = db.path
    assert db_path == path
    log = path / "wal.log"
    data = bytearray(log.read_bytes())
    data[-5] ^= 0x10  # inside the last record
    log.write_bytes(bytes(data))
    with pytest.raises(DatabaseCorruptError, match="wal.log"):
        Database.open(path, read_only=True)


def collect_lines(stream, out: list[str]) -> None:
    for line in stream:
        if line.endswith("\n"):  # a line the kill cut short was never an acknowledgement
            out.append(line.strip())


def test_sigkill_at_random_moments_loses_no_acknowledged_change(tmp_path: Path) -> None:
    """A child cycles add / add more / remove entries / rename / merge / remove a source and
    acknowledges each change; it is killed at random moments, 12 times. Every cycle is in one of
    the states between two changes, never half-applied; the last acknowledged cycle is at its
    acknowledged step or one beyond; and the entries that were kept hold their vectors byte for
    byte and their provenance."""
    path = tmp_path / "db"
    Database.create(path, CRASH_DIM, storage="fp32").close()
    rng = random.Random(0)
    acknowledged = (-1, len(CURATION_STATES) - 1)  # (cycle, step in CURATION_STATES) last acknowledged
    changes = 0
    for _ in range(12):
        # a cycle cut short stays as the kill left it; the next child starts a new one
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "support" / "curation_writer.py"), str(path), str(next_cycle(path))],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert proc.stdout.readline().strip() == "ready", "the child could not open the database"
        got: list[str] = []
        reader = threading.Thread(target=collect_lines, args=(proc.stdout, got))
        reader.start()
        time.sleep(rng.uniform(0.02, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reader.join()
        proc.stdout.close()
        if got:
            cycle, step = got[-1].split()
            acknowledged = (int(cycle), [s[0] for s in CURATION_STATES].index(step))
            changes += len(got)
        with Database.open(path, read_only=True) as db:
            check_cycles(db, acknowledged)
    assert changes >= 24, "the child should get some work done between kills"


def next_cycle(path: Path) -> int:
    """The first cycle number the database holds nothing of."""
    with Database.open(path, read_only=True) as db:
        cycles = [int(n.removeprefix("keep")) for n in db.classes if n.startswith("keep")]
    return max(cycles, default=-1) + 1


def check_cycles(db: Database, acknowledged: tuple[int, int]) -> None:
    classes = db.classes
    ids, labels = db.ids_and_labels()
    cycles = sorted({int(n[4:] if n.startswith("keep") else n[1:]) for n in classes})
    for i in cycles:
        holds = (classes.get(f"keep{i}"), classes.get(f"x{i}"), classes.get(f"y{i}"))
        states = [s[0] for s in CURATION_STATES if s[1:] == holds]
        assert states, f"cycle {i} is half-applied: keep, x, y = {holds}"
        step = [s[0] for s in CURATION_STATES].index(states[0])
        if i == acknowledged[0]:  # at its acknowledged step, or the one in flight when it was killed
            assert acknowledged[1] <= step <= acknowledged[1] + 1, (
                f"cycle {i}: acknowledged {acknowledged[1]}, at {step}"
            )
        elif i > acknowledged[0]:  # never acknowledged: at most its first change, in flight
            assert step <= 1, f"cycle {i} went past a change that was never acknowledged"
        keep = ids[labels == db.vocabulary.find(f"keep{i}").id][: CRASH_BATCH // 2]
        records = db.entries(f"keep{i}")[: CRASH_BATCH // 2]
        assert {r.source for r in records} == {f"image{i}.png"}, "provenance survives the kills"
        assert [r.mask for r in records] == list(range(CRASH_BATCH // 2))
        x = crash_batch(i)[: CRASH_BATCH // 2]
        np.testing.assert_allclose(db.vectors(keep), x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-6)
