"""The database under real faults: damaged log records, a full disk, a read-only file system,
racing creators, files pointing outside the folder, dropped writers, readers racing checkpoints.
Each promise: nothing acknowledged lost, nothing outside the folder touched, a named error."""

from __future__ import annotations

import errno
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from knnclip.engine import Database
from knnclip.engine.database.wal import HEADER_BYTES
from knnclip.engine.errors import (
    DatabaseCorruptError,
    DatabaseExistsError,
    DatabaseNotTrainedError,
    DatabaseWriteError,
)
from tests.support.db_helpers import file_digests

DIM = 8


RECORD_HEAD = struct.Struct("<QII")  # length, CRC of the length, CRC of length + payload (wal.py's format 2)


def make_db(path: Path, batches: int = 3) -> None:
    """A database whose batches live only in the log."""
    db = Database.create(path, DIM)
    for i in range(batches):
        db.add(np.random.default_rng(i).normal(size=(4, DIM)), [f"c{i}"] * 4)
    db.close(checkpoint=False)


def record_offsets(log: Path) -> list[int]:
    """Where each record of a format-2 log starts, read from the length fields."""
    data = log.read_bytes()
    offsets, at = [], HEADER_BYTES
    while at + RECORD_HEAD.size <= len(data):
        (length, _, _) = RECORD_HEAD.unpack_from(data, at)
        offsets.append(at)
        at += RECORD_HEAD.size + length
    return offsets


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "knnclip.engine.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("record", [0, 1])
@pytest.mark.parametrize("bit", [0, 13, 40])
def test_flipped_bit_in_a_length_field_is_corruption_not_a_tail(tmp_path: Path, record: int, bit: int) -> None:
    path = tmp_path / "db"
    make_db(path)
    log = path / "wal.log"
    data = bytearray(log.read_bytes())
    data[record_offsets(log)[record] + bit // 8] ^= 1 << (bit % 8)
    log.write_bytes(bytes(data))
    before = file_digests(path)
    for read_only in (True, False):
        with pytest.raises(DatabaseCorruptError, match="record head is damaged"):
            Database.open(path, read_only=read_only)
    done = cli("db", "check", str(path))
    assert done.returncode == 3 and "record head is damaged" in done.stderr
    after = file_digests(path)
    after.pop("LOCK", None)
    before.pop("LOCK", None)
    assert after == before, "nothing was cut, truncated or checkpointed"


def test_torn_tail_is_reported_by_check_and_kept_aside_by_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "db"
    make_db(path)
    log = path / "wal.log"
    whole = log.read_bytes()
    last = record_offsets(log)[-1]
    torn = whole[last:][: (len(whole) - last) // 3]  # a further record's first third, as a crash leaves it
    log.write_bytes(whole + torn)
    done = cli("db", "check", str(path))
    assert done.returncode == 0 and f"torn record of {len(torn)} bytes at byte {len(whole)}" in done.stdout
    with Database.open(path) as db:
        assert len(db) == 12
        (aside,) = path.glob("wal.log.torn-*")
        assert aside.read_bytes() == torn and db.stats()["log_tail_kept"] == str(aside)
        db.add(np.ones((1, DIM)), ["after"])
    with Database.open(path, read_only=True) as db:
        assert db.classes == {"c0": 4, "c1": 4, "c2": 4, "after": 1}
    assert (path / aside.name).exists(), "the next writer open does not delete what was kept aside"


def test_head_cut_short_then_zeros_is_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "db"
    make_db(path)
    log = path / "wal.log"
    whole = log.read_bytes()
    head = whole[record_offsets(log)[0] :][:5]  # 5 of a head's 16 bytes reached the disk, then zeros
    log.write_bytes(whole + head + bytes(4000))
    with Database.open(path, read_only=True) as db:
        assert len(db) == 12 and db.stats()["log_torn_bytes"] == 4005


def test_format_1_log_is_read_and_rewritten_in_format_2(tmp_path: Path) -> None:
    """A database whose log an older knnclip wrote (records without the head checksum)."""
    from knnclip import _C

    path = tmp_path / "db"
    make_db(path)
    log = path / "wal.log"
    data = log.read_bytes()
    v1 = bytearray(b"KNNCWAL1" + data[8:HEADER_BYTES])
    for at in record_offsets(log):
        length, _, _ = RECORD_HEAD.unpack_from(data, at)
        payload = data[at + RECORD_HEAD.size : at + RECORD_HEAD.size + length]
        length_bytes = struct.pack("<Q", length)
        v1 += length_bytes + struct.pack("<I", _C.crc32c(payload, _C.crc32c(length_bytes))) + payload
    log.write_bytes(bytes(v1))
    with Database.open(path, read_only=True) as db:
        assert db.classes == {"c0": 4, "c1": 4, "c2": 4}
    with Database.open(path) as db:  # a writer checkpoints the old log away
        assert db.stats()["log_bytes"] == HEADER_BYTES
    assert log.read_bytes()[:8] == b"KNNCWAL2"
    with Database.open(path, read_only=True) as db:
        assert db.classes == {"c0": 4, "c1": 4, "c2": 4}


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 4 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path) -> Path:
    """Fill the file system until writes fail with ENOSPC; returns the filler (delete it to free space)."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\xff" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_full_disk_train_leaves_the_database_untrained(small_disk: Path) -> None:
    path = small_disk / "db"
    x = np.random.default_rng(0).normal(size=(400, DIM)).astype(np.float32)
    Database.create(path, DIM, index="ivf-flat", index_params={"nlist": 4}).close()
    db = Database.open(path)
    filler = fill(small_disk)
    with pytest.raises(DatabaseWriteError, match="No space left on device.*nothing was changed"):
        db.train(x)
    assert not db.is_trained
    with pytest.raises(DatabaseNotTrainedError):
        db.add(x[:3], ["a"] * 3)
    db.close()
    assert [p.name for p in path.iterdir() if p.name.startswith(".")] == [], "no temporary file left"
    filler.unlink()
    with Database.open(path) as db:
        assert not db.is_trained
        db.train(x)
        db.add(x[:3], ["a"] * 3)
    with Database.open(path, read_only=True) as db:
        assert db.classes == {"a": 3}


def test_full_disk_add_is_refused_and_nothing_changes(small_disk: Path) -> None:
    path = small_disk / "db"
    rng = np.random.default_rng(1)
    db = Database.create(path, DIM)
    db.add(rng.normal(size=(5, DIM)), ["a"] * 5)
    q = rng.normal(size=(3, DIM))
    before = db.search(q, 4)
    filler = fill(small_disk)
    big = rng.normal(size=(2000, DIM))  # 72 kB: more than the few bytes left
    with pytest.raises(DatabaseWriteError, match="could not append to the log.*nothing was changed"):
        db.add(big, ["b"] * len(big))
    assert len(db) == 5 and db.classes == {"a": 5}
    np.testing.assert_array_equal(db.search(q, 4).ids, before.ids)
    db.close(checkpoint=False)
    filler.unlink()
    with Database.open(path) as db:
        assert db.classes == {"a": 5}
        db.add(big[:2], ["b"] * 2)
        assert db.classes == {"a": 5, "b": 2}


def test_failed_automatic_checkpoint_does_not_fail_the_add(tmp_path: Path, monkeypatch) -> None:
    """The add is durable before the checkpoint runs, so it is acknowledged exactly once."""
    import faiss

    path = tmp_path / "db"
    db = Database.create(path, DIM)
    db.auto_checkpoint_bytes = 1  # every add triggers one

    def no_space(index, name):
        raise RuntimeError("Error in faiss::FileIOWriter::operator(): fwrite failed: No space left on device")

    monkeypatch.setattr(faiss, "write_index", no_space)
    ids = db.add(np.ones((2, DIM)), ["a", "a"])
    ids2 = db.add(np.ones((1, DIM)), ["a"])
    assert ids.tolist() == [0, 1] and ids2.tolist() == [2]
    monkeypatch.undo()
    db.close(checkpoint=False)
    with Database.open(path, read_only=True) as db:
        assert db.classes == {"a": 3}, "stored once each, in the log"
    assert not list(path.glob("index.000002.faiss")), "the failed generation was removed"


def test_read_only_file_system_is_a_named_error_and_one_cli_line(small_disk: Path) -> None:
    path = small_disk / "db"
    make_db(path)
    np.save(small_disk / "x.npy", np.ones((2, DIM), np.float32))
    (small_disk / "x.txt").write_text("a\na\n")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(DatabaseWriteError, match="Read-only file system.*read_only=True"):
        Database.open(path)
    with Database.open(path, read_only=True) as db:
        assert len(db) == 12
    done = cli("db", "add", str(path), str(small_disk / "x.npy"))
    assert done.returncode == 5 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Read-only file system" in done.stderr


def test_racing_creates_one_wins_the_other_gets_a_named_error(tmp_path: Path) -> None:
    import threading

    target, errors, barrier = tmp_path / "db", [], threading.Barrier(8)

    def create() -> None:
        barrier.wait()
        try:
            Database.create(target, DIM).close()
        except Exception as exc:  # noqa: BLE001 - collected and checked below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 7 and all(isinstance(e, DatabaseExistsError) for e in errors), errors
    with Database.open(target, read_only=True) as db:
        assert len(db) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["db"], "no temporary folder left"


def test_manifest_naming_a_file_outside_is_refused_and_the_file_untouched(tmp_path: Path) -> None:
    import json

    from knnclip.engine.fsutil import json_content_hash

    path, outside = tmp_path / "db", tmp_path / "outside"
    make_db(path)
    with Database.open(path) as db:
        db.checkpoint()
    outside.mkdir()
    manifest = json.loads((path / "manifest.json").read_text())
    index_name = manifest["files"]["index"]["name"]
    (outside / "index.faiss").write_bytes((path / index_name).read_bytes())
    manifest["files"]["index"]["name"] = "../outside/index.faiss"
    manifest.pop("manifest_sha256")
    manifest["manifest_sha256"] = json_content_hash(manifest)  # recomputed, as anyone can
    (path / "manifest.json").write_text(json.dumps(manifest))
    for read_only in (True, False):
        with pytest.raises(DatabaseCorruptError, match="only index"):
            Database.open(path, read_only=read_only)
    assert (outside / "index.faiss").exists()


def test_symlinked_database_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db"
    make_db(path)
    entries = next(path.glob("entries.*.npy"))
    moved = tmp_path / "elsewhere.npy"
    entries.rename(moved)
    entries.symlink_to(moved)
    with pytest.raises(DatabaseCorruptError, match="symlink"):
        Database.open(path, read_only=True)


def test_writer_dropped_without_close_releases_its_lock(tmp_path: Path) -> None:
    import gc

    path = tmp_path / "db"
    make_db(path)
    writer = Database.open(path)
    writer.add(np.ones((1, DIM)), ["x"])
    del writer
    gc.collect()
    with Database.open(path) as db:  # would raise DatabaseLockedError if the lock leaked
        assert db.classes["x"] == 1


def test_readers_racing_checkpoints_never_fail(tmp_path: Path) -> None:
    import threading

    path = tmp_path / "db"
    make_db(path)
    writer = Database.open(path)
    stop, failures, reads = threading.Event(), [], [0]

    def reader() -> None:
        while not stop.is_set():
            try:
                with Database.open(path, read_only=True) as db:
                    for _ in range(3):
                        db.stats()
                    assert len(db) >= 12
                reads[0] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is collected and asserted on
                failures.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    rng = np.random.default_rng(2)
    for i in range(60):
        writer.add(rng.normal(size=(2, DIM)), [f"w{i % 4}"] * 2)
        writer.checkpoint()
    stop.set()
    for t in threads:
        t.join()
    writer.close()
    assert failures == [] and reads[0] > 10


def test_a_writer_whose_change_fails_after_logging_says_so_and_reopens_whole(tmp_path: Path, monkeypatch) -> None:
    """The log holds the change but memory could not take it (here: memory runs out in apply):
    the writer refuses everything after, naming what failed, not "opened read_only"; a reopen
    replays the durable change."""
    from knnclip.engine.database import DatabaseState
    from knnclip.engine.database.contents import Contents
    from knnclip.engine.errors import ReadOnlyDatabaseError

    path = tmp_path / "db"
    db = Database.create(path, DIM)
    db.add(np.eye(DIM)[:2], ["a", "b"])
    assert db.state is DatabaseState.WRITER and "writer" in repr(db)

    def out_of_memory(self, record):
        raise MemoryError("no room for the new rows")

    with monkeypatch.context() as patch:
        patch.setattr(Contents, "apply", out_of_memory)
        with pytest.raises(MemoryError):
            db.add(np.eye(DIM)[2:3], ["c"])
    assert db.state is DatabaseState.FAILED and db.read_only and "failed" in repr(db)
    with pytest.raises(ReadOnlyDatabaseError, match="logged but could not be applied.*MemoryError.*reopen"):
        db.add(np.eye(DIM)[3:4], ["d"])
    assert len(db) == 2, "searches still see what was applied"
    db.close()  # no checkpoint of memory that differs from the log
    assert db.state is DatabaseState.CLOSED
    with Database.open(path, read_only=True) as again:
        assert again.state is DatabaseState.READ_ONLY
        assert len(again) == 3 and again.classes == {"a": 1, "b": 1, "c": 1}
