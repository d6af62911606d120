"""Trust under faults: each test injects its fault for real (damaged files, a full disk, a
read-only directory, hostile names, real threads) and asserts the promise: nothing acknowledged
lost, nothing outside the directory touched, a named error, the other inputs intact."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from knnclip.engine import Database
from knnclip.engine.database.wal import HEADER_BYTES
from knnclip.engine.errors import DatabaseCorruptError
from tests.db_helpers import file_digests

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


# 1. Write-ahead log: a damaged record is never a torn tail ---------------------------------------
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
