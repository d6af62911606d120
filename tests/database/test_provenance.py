"""Where every entry came from: the source given to add (one for all, or one per entry), its
index in that call and the time, kept through the log, checkpoints and snapshots with the same
guarantees as the entries; listed with filters and pages; a source undone without touching any
other entry; a database from before provenance opens unchanged and its first checkpoint writes
it; damage to the new file is refused."""

from __future__ import annotations

import dataclasses
import io
import time
from pathlib import Path

import numpy as np
import pytest

from knnclip.engine import Database
from knnclip.engine.database.manifest import Manifest
from knnclip.engine.errors import DatabaseCorruptError, InvalidInputError
from tests.support.db_helpers import clustered

DIM = 16


@pytest.fixture
def db(tmp_path: Path):
    database = Database.create(tmp_path / "db", DIM, storage="fp32")
    yield database
    database.close()


def add_three_sources(db: Database) -> tuple[np.ndarray, float, float]:
    x, labels = clustered(30, DIM, 3, seed=1)
    names = [("cat", "dog", "bird")[c] for c in labels]
    start = time.time()
    first = db.add(x[:10], names[:10], sources="a.jpg")
    second = db.add(x[10:20], names[10:20], sources=[f"upload-{i % 2}" if i % 3 else None for i in range(10)])
    third = db.add(x[20:], names[20:])  # no source
    return np.concatenate([first, second, third]), start, time.time()


def test_each_entry_records_its_source_index_and_time(db: Database) -> None:
    ids, start, end = add_three_sources(db)
    records = db.entries()
    assert [r.id for r in records] == ids.tolist()
    assert [r.source for r in records[:10]] == ["a.jpg"] * 10
    assert [r.source for r in records[10:20]] == [f"upload-{i % 2}" if i % 3 else None for i in range(10)]
    assert all(r.source is None for r in records[20:])
    assert [r.mask for r in records] == list(range(10)) * 3  # the index in its add call
    assert all(start <= r.time <= end for r in records)
    assert records[0].time <= records[10].time <= records[20].time
    cats = db.entries("cat")
    assert cats and all(r.class_name == "cat" for r in cats) and len(cats) == db.classes["cat"]
    assert [r.id for r in db.entries(source="upload-1")] == [r.id for r in records[10:20] if r.source == "upload-1"]
    assert [r.id for r in db.entries("dog", "a.jpg")] == [r.id for r in records[:10] if r.class_name == "dog"]
    assert db.entries(source="never") == []
    assert [r.id for r in db.entries(offset=5, limit=7)] == ids[5:12].tolist()
    with pytest.raises(InvalidInputError, match="offset and limit"):
        db.entries(offset=-1)


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        (["a"] * 3, "3 sources for 2 embeddings"),
        ("", "non-empty string"),
        ([1, 2], "non-empty string"),
        ("x" * 2000, "at most 1024"),
    ],
)
def test_bad_sources_are_refused_and_nothing_is_added(db: Database, sources, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        db.add(np.eye(DIM)[:2], ["a", "b"], sources=sources)
    assert len(db) == 0 and db.classes == {}


def test_provenance_survives_replay_checkpoint_and_snapshot(db: Database, tmp_path: Path) -> None:
    add_three_sources(db)
    expected = db.entries()
    path = db.path
    db.close(checkpoint=False)
    with Database.open(path) as replayed:  # from the log
        assert replayed.entries() == expected
        replayed.checkpoint()
        replayed.snapshot(tmp_path / "copy")
    assert sorted(p.name.split(".")[0] for p in path.iterdir() if p.suffix == ".npz") == ["provenance"]
    for where in (path, tmp_path / "copy"):
        with Database.open(where, read_only=True) as again:
            assert again.entries() == expected


def test_removing_a_source_removes_its_entries_and_nothing_else(db: Database) -> None:
    ids, _, _ = add_three_sources(db)
    queries = clustered(30, DIM, 3, seed=7)[0]
    before = db.search(queries, 4)
    gone = {r.id for r in db.entries(source="upload-0")}
    kept = [r for r in db.entries() if r.id not in gone]
    assert db.remove_source("upload-0") == len(gone) > 0
    assert db.remove_source("upload-0") == 0 and db.remove_source("never") == 0
    assert db.entries() == kept, "every other entry, with its provenance, as it was"
    after = db.search(queries, 4)
    untouched = np.array([not (set(row.tolist()) & gone) for row in before.ids])
    assert untouched.sum() >= 10
    np.testing.assert_array_equal(after.ids[untouched], before.ids[untouched])
    np.testing.assert_array_equal(after.sims[untouched], before.sims[untouched])
    path = db.path
    db.close()
    with Database.open(path, read_only=True) as again:
        assert again.entries() == kept


def strip_provenance(path: Path) -> None:
    """Make a checkpoint look as a database from before provenance: no provenance file listed."""
    manifest = Manifest.read(path)
    name = manifest.files["provenance"].name
    files = {k: f for k, f in manifest.files.items() if k != "provenance"}
    dataclasses.replace(manifest, files=files).write(path)
    (path / name).unlink()


def test_a_database_from_before_provenance_opens_and_its_first_checkpoint_writes_it(db: Database) -> None:
    x, _ = clustered(8, DIM, 2, seed=3)
    db.add(x, ["old"] * 8)
    db.checkpoint()
    path = db.path
    db.close()
    strip_provenance(path)
    with Database.open(path, read_only=True) as old:
        assert [(r.class_name, r.source, r.mask, r.time) for r in old.entries()] == [("old", None, None, None)] * 8
    assert "provenance" not in Manifest.read(path).files, "a reader changes nothing"
    with Database.open(path) as writer:  # the first writer upgrades it, at once
        assert "provenance" in Manifest.read(path).files
        writer.add(x[:2], ["new"] * 2, sources="fresh.png")
    with Database.open(path, read_only=True) as upgraded:
        records = upgraded.entries()
        assert [r.source for r in records] == [None] * 8 + ["fresh.png"] * 2
        assert records[0].time is None and records[-1].time is not None


def test_damaged_provenance_is_refused_on_open(db: Database) -> None:
    add_three_sources(db)
    db.checkpoint()
    path = db.path
    db.close()
    prov = next(path.glob("provenance.*.npz"))
    data = bytearray(prov.read_bytes())
    data[len(data) // 2] ^= 0x04
    prov.write_bytes(bytes(data))
    with pytest.raises(DatabaseCorruptError, match="provenance.*SHA-256"):
        Database.open(path, read_only=True)


def test_forged_provenance_with_a_matching_hash_is_still_refused(db: Database) -> None:
    """Anyone can recompute a hash: the content is checked too (sources it does not hold)."""
    import hashlib

    add_three_sources(db)
    db.checkpoint()
    path = db.path
    db.close()
    manifest = Manifest.read(path)
    record = manifest.files["provenance"]
    with np.load(path / record.name) as arrays:
        parts = {k: arrays[k] for k in arrays.files}
    parts["source"] = parts["source"].copy()
    parts["source"][0] = 99
    buf = io.BytesIO()
    np.savez(buf, **parts)
    (path / record.name).write_bytes(buf.getvalue())
    forged = dataclasses.replace(record, bytes=len(buf.getvalue()), sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    dataclasses.replace(manifest, files={**manifest.files, "provenance": forged}).write(path)
    with pytest.raises(DatabaseCorruptError, match="names a source it does not hold"):
        Database.open(path, read_only=True)
