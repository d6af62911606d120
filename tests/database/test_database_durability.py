"""Database durability: torn log tails, corrupt and foreign files, interrupted checkpoints, SIGKILL."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from knnclip.engine import Database
from knnclip.engine.database.wal import HEADER_BYTES
from knnclip.engine.errors import DatabaseCorruptError
from tests.support.db_helpers import CRASH_BATCH, CRASH_DIM, crash_batch, file_digests

ROOT = Path(__file__).resolve().parents[2]


def make_db(path: Path, batches: int = 3, checkpoint_after: int | None = None) -> None:
    """A database whose later batches live only in the log (close without checkpoint)."""
    db = Database.create(path, 8)
    for i in range(batches):
        db.add(np.random.default_rng(i).normal(size=(4, 8)), [f"c{i}"] * 4)
        if checkpoint_after == i:
            db.checkpoint()
    db.close(checkpoint=False)


def wal(path: Path) -> Path:
    return path / "wal.log"


def only(path: Path, prefix: str) -> Path:
    (found,) = [p for p in path.iterdir() if p.name.startswith(prefix)]
    return found


def test_torn_tail_is_dropped_and_the_writer_appends_after_it(tmp_path: Path) -> None:
    path = tmp_path / "db"
    make_db(path)
    full = wal(path).read_bytes()
    with open(wal(path), "ab") as f:  # half of a further record, as a crash mid-write leaves it
        record = full[HEADER_BYTES:]
        f.write(record[: len(record) // 6])
    with Database.open(path, read_only=True) as db:
        assert len(db) == 12
    assert wal(path).stat().st_size > len(full), "a reader never modifies files"
    with Database.open(path) as db:
        assert len(db) == 12 and wal(path).stat().st_size == len(full), "the writer cut the torn tail off"
        db.add(np.ones((1, 8)), ["after"])
    with Database.open(path, read_only=True) as db:
        assert db.classes == {"c0": 4, "c1": 4, "c2": 4, "after": 1}


def test_zero_filled_tail_is_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "db"
    make_db(path)
    with open(wal(path), "ab") as f:
        f.write(bytes(4096))
    with Database.open(path, read_only=True) as db:
        assert len(db) == 12


def assert_corrupt_and_untouched(path: Path, culprit: str) -> None:
    before = file_digests(path)
    for read_only in (True, False):
        with pytest.raises(DatabaseCorruptError) as info:
            Database.open(path, read_only=read_only)
        assert culprit in info.value.path and culprit in str(info.value)
    before.pop("LOCK", None)
    after = file_digests(path)
    after.pop("LOCK", None)
    assert after == before, "opening a corrupt database must not change any file"


def flip_byte(p: Path, offset: int) -> None:
    data = bytearray(p.read_bytes())
    data[offset] ^= 0x40
    p.write_bytes(bytes(data))


def test_flipped_byte_in_a_log_record(tmp_path: Path) -> None:
    path = tmp_path / "db"
    make_db(path)
    size = wal(path).stat().st_size
    flip_byte(wal(path), HEADER_BYTES + (size - HEADER_BYTES) // 2)  # inside the middle record
    assert_corrupt_and_untouched(path, "wal.log")


def test_flipped_byte_in_the_last_log_record(tmp_path: Path) -> None:
    path = tmp_path / "db"
    make_db(path)
    flip_byte(wal(path), wal(path).stat().st_size - 3)
    assert_corrupt_and_untouched(path, "wal.log")


def test_truncated_index_file(tmp_path: Path) -> None:
    path = tmp_path / "db"
    make_db(path, checkpoint_after=1)
    index = only(path, "index.")
    index.write_bytes(index.read_bytes()[:-100])
    assert_corrupt_and_untouched(path, index.name)


def test_flipped_byte_in_index_and_entries_files(tmp_path: Path) -> None:
    for prefix in ("index.", "entries."):
        path = tmp_path / prefix.rstrip(".")
        make_db(path, checkpoint_after=1)
        target = only(path, prefix)
        flip_byte(target, target.stat().st_size - 5)
        assert_corrupt_and_untouched(path, target.name)


def test_wrong_manifest_version(tmp_path: Path) -> None:
    path = tmp_path / "db"
    make_db(path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert_corrupt_and_untouched(path, "manifest.json")
    with pytest.raises(DatabaseCorruptError, match="format version 99"):
        Database.open(path, read_only=True)


def test_edited_manifest_fails_its_checksum(tmp_path: Path) -> None:
    path = tmp_path / "db"
    make_db(path)
    text = (path / "manifest.json").read_text().replace('"dim": 8', '"dim": 9')
    (path / "manifest.json").write_text(text)
    assert_corrupt_and_untouched(path, "manifest.json")


@pytest.mark.parametrize("victim", ["manifest.json", "wal.log", "entries."])
def test_file_of_another_program(tmp_path: Path, victim: str) -> None:
    path = tmp_path / "db"
    make_db(path, checkpoint_after=0)
    target = path / victim if not victim.endswith(".") else only(path, victim)
    target.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    assert_corrupt_and_untouched(path, target.name)


def test_log_of_another_database(tmp_path: Path) -> None:
    make_db(tmp_path / "a")
    make_db(tmp_path / "b")
    shutil.copy(wal(tmp_path / "a"), wal(tmp_path / "b"))
    assert_corrupt_and_untouched(tmp_path / "b", "wal.log")


def test_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "db"
    make_db(path, checkpoint_after=0)
    only(path, "index.").unlink()
    assert_corrupt_and_untouched(path, "index.")
    path2 = tmp_path / "db2"
    make_db(path2)
    wal(path2).unlink()
    assert_corrupt_and_untouched(path2, "wal.log")


def test_crash_between_manifest_and_log_reset_replays_nothing_twice(tmp_path: Path) -> None:
    path = tmp_path / "db"
    make_db(path)
    old_log = wal(path).read_bytes()
    with Database.open(path) as db:
        db.checkpoint()
        expected = db.ids_and_labels()
    # As if the process died after the new manifest but before the empty log replaced the old one:
    wal(path).write_bytes(old_log)
    (path / ".index.000099.faiss.123.tmp").write_bytes(b"half-written")
    with Database.open(path) as db:
        for a, b in zip(db.ids_and_labels(), expected, strict=True):
            np.testing.assert_array_equal(a, b)
    assert not (path / ".index.000099.faiss.123.tmp").exists(), "the writer removes an interrupted checkpoint's files"


def collect_lines(stream, out: list[str]) -> None:
    """Append lines until EOF (the child's death closes its stdout)."""
    for line in stream:
        out.append(line.strip())


@pytest.mark.parametrize("index", ["flat", "ivf-rabitq"])
def test_sigkill_at_random_moments_loses_no_acknowledged_batch(tmp_path: Path, index: str) -> None:
    """A writer killed at random moments (inside adds and checkpoints) loses nothing it
    acknowledged; a reader that follows it throughout holds what a fresh open holds."""
    kills = int(os.environ.get("KNNCLIP_CRASH_KILLS", "20"))
    path = tmp_path / "db"
    if index == "flat":
        Database.create(path, CRASH_DIM, storage="fp32").close()
        atol = 1e-6
    else:  # the re-rank store's segments and its log records must agree after every kill
        with Database.create(path, CRASH_DIM, index="ivf-rabitq", storage="fp16", index_params={"store": "disk"}) as db:
            db.train(np.random.default_rng(5).normal(size=(400, CRASH_DIM)))
        atol = 1e-3
    follower = Database.open(path, read_only=True)
    rng = random.Random(0)
    acknowledged = -1
    next_batch = 0
    for _ in range(kills):
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "support" / "crash_writer.py"), str(path), str(next_batch)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert proc.stdout.readline().strip() == "ready", "the child could not open the database"
        # Acknowledgements are read on a thread so the kill lands at a random time, not between lines.
        deadline = time.monotonic() + rng.uniform(0.02, 0.4)
        got: list[str] = []
        reader = threading.Thread(target=collect_lines, args=(proc.stdout, got))
        reader.start()
        time.sleep(max(0.0, deadline - time.monotonic()))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reader.join()
        proc.stdout.close()
        if got:
            acknowledged = int(got[-1])

        follower.follow()
        with Database.open(path, read_only=True) as db:
            counts = db.classes
            ids, labels = db.ids_and_labels()
            present = sorted(int(name.removeprefix("batch")) for name in counts)
            assert all(counts[f"batch{b}"] == CRASH_BATCH for b in present), f"partial batch: {counts}"
            assert present == list(range(len(present))), "batches are contiguous"
            assert len(present) - 1 >= acknowledged, f"batch {acknowledged} was acknowledged but is missing"
            assert len(present) - 1 <= acknowledged + 1, "at most the in-flight batch beyond the acknowledged"
            vocab = db.vocabulary
            for b in (present[0], present[-1]) if present else ():
                rows = ids[labels == vocab.find(f"batch{b}").id]
                x = crash_batch(b)
                np.testing.assert_allclose(db.vectors(rows), x / np.linalg.norm(x, axis=1, keepdims=True), atol=atol)
            for a, b in zip(follower.ids_and_labels(), (ids, labels), strict=True):
                np.testing.assert_array_equal(a, b)
            assert follower.vocabulary == vocab
            next_batch = len(present)
    follower.close()
    assert acknowledged >= kills // 2, "the child should get some work done between kills"


def test_a_forked_child_does_not_keep_the_writer_lock(tmp_path: Path) -> None:
    """A library that forks while a writer is open (OpenVINO's telemetry does, at import) must not
    leave the database locked after the writer closes or dies: the child drops its copy."""
    script = f"""
import os, signal, sys, time
import numpy as np
from knnclip.engine import Database
from knnclip.engine.errors import DatabaseLockedError
path = {str(tmp_path / "db")!r}
db = Database.create(path, 4)
db.add(np.eye(4, dtype=np.float32), ["a", "b", "c", "d"])
child = os.fork()
if child == 0:
    time.sleep(20)
    os._exit(0)
try:
    db.close()
    try:
        Database.open(path).close()
        print("reopened")
    except DatabaseLockedError as exc:
        print("locked:", exc)
finally:
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "reopened", done.stdout + done.stderr


def test_a_reader_that_keeps_losing_the_race_is_told_busy_not_corrupt(tmp_path: Path, monkeypatch) -> None:
    """Stand-ins for a writer that checkpoints faster than a reader can read: the manifest is new
    at every look and the files it named are gone. Nothing is damaged, so the error says busy."""
    import itertools

    from knnclip.engine.database import database as database_module
    from knnclip.engine.errors import DatabaseBusyError, DatabaseCorruptError

    path = tmp_path / "db"
    with Database.create(path, 4) as db:
        db.add(np.eye(4, dtype=np.float32), ["a", "b", "c", "d"])
    versions = itertools.count()

    def replaced(*args, **kwargs):
        raise DatabaseCorruptError(path / "index.faiss", "a checkpoint file vanished under the reader")

    monkeypatch.setattr(database_module.disk, "read_or_none", lambda p: str(next(versions)).encode())
    monkeypatch.setattr(database_module.disk, "load_checkpoint", replaced)
    with pytest.raises(DatabaseBusyError, match="nothing is damaged"):
        Database.open(path, read_only=True)
    monkeypatch.setattr(database_module.disk, "read_or_none", lambda p: b"the same manifest")
    with pytest.raises(DatabaseCorruptError):  # a manifest that did not change: the damage is real
        Database.open(path, read_only=True)
