"""The write-ahead log: every change is appended and fsynced here before it touches the index.

File layout (little-endian)::

    header   magic "KNNCWAL1" (8 B) | database uuid (16 B) | base lsn u64
    record   payload length u64 | CRC-32C of (length bytes + payload) u32 | payload
    payload  lsn u64 | kind u8 | meta length u32 | meta (UTF-8 JSON) | body (raw arrays)

Log sequence numbers (lsn) count up by one from ``base lsn + 1``. A record cut short by a crash
(fewer bytes on disk than its length says, or a zero-filled tail) is a torn tail: it is dropped,
because its write never returned. A complete record whose checksum does not match is corruption
and is reported, never skipped: the records after it may depend on it.
"""

from __future__ import annotations

import enum
import json
import os
import struct
import uuid as uuid_mod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knnclip import _C
from knnclip.engine.errors import DatabaseCorruptError, DatabaseError
from knnclip.engine.fsutil import atomic_write_bytes, write_all

MAGIC = b"KNNCWAL1"
_HEADER = struct.Struct("<8s16sQ")
_RECORD_HEAD = struct.Struct("<QI")
_PAYLOAD_HEAD = struct.Struct("<QBI")
HEADER_BYTES = _HEADER.size


class RecordKind(enum.IntEnum):
    ADD = 1  # meta: first_id, n, dim, classes (new or changed ClassInfo); body: class ids int64[n], float32[n, dim]
    REMOVE_CLASS = 2  # meta: class_id
    PUT_CLASS = 3  # meta: class (ClassInfo JSON)


@dataclass
class Record:
    lsn: int
    kind: RecordKind
    meta: dict[str, Any]
    body: memoryview = field(repr=False)


@dataclass
class LogContents:
    base_lsn: int
    records: list[Record]
    valid_end: int  # bytes of header + whole records; anything after is a torn tail
    torn_bytes: int


def encode_record(lsn: int, kind: RecordKind, meta: dict[str, Any], *body: bytes | memoryview) -> bytes:
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    payload = b"".join([_PAYLOAD_HEAD.pack(lsn, int(kind), len(meta_bytes)), meta_bytes, *body])
    length = struct.pack("<Q", len(payload))
    crc = _C.crc32c(payload, _C.crc32c(length))
    return length + struct.pack("<I", crc) + payload


def create_log(path: Path, db_uuid: uuid_mod.UUID, base_lsn: int) -> None:
    """Write an empty log (header only) atomically, replacing any log at ``path``."""
    atomic_write_bytes(path, _HEADER.pack(MAGIC, db_uuid.bytes, base_lsn))


def read_log(path: Path, db_uuid: uuid_mod.UUID) -> LogContents:
    """Parse the whole log; raise DatabaseCorruptError naming ``path`` on anything but a torn tail."""
    try:
        data = memoryview(path.read_bytes())
    except FileNotFoundError:
        raise DatabaseCorruptError(path, "the write-ahead log is missing") from None
    if len(data) < HEADER_BYTES:
        raise DatabaseCorruptError(path, f"write-ahead log header is truncated ({len(data)} of {HEADER_BYTES} bytes)")
    magic, file_uuid, base_lsn = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise DatabaseCorruptError(path, f"not a knnclip write-ahead log (starts with {bytes(magic)!r})")
    if file_uuid != db_uuid.bytes:
        raise DatabaseCorruptError(
            path, f"write-ahead log belongs to database {uuid_mod.UUID(bytes=file_uuid)}, not {db_uuid}"
        )
    records: list[Record] = []
    offset = HEADER_BYTES
    expected_lsn = base_lsn + 1
    while offset < len(data):
        rest = data[offset:]
        if len(rest) < _RECORD_HEAD.size or not any(rest[: _RECORD_HEAD.size]):
            # A partial record head, or the zeros a file system leaves when the size was
            # extended but the data never reached the disk.
            if any(rest) and len(rest) >= _RECORD_HEAD.size:
                raise DatabaseCorruptError(path, f"record at byte {offset}: zero length followed by data")
            break
        length, crc = _RECORD_HEAD.unpack_from(rest, 0)
        end = _RECORD_HEAD.size + length
        if end > len(rest):
            break  # torn tail: the write was cut short
        payload = rest[_RECORD_HEAD.size : end]
        if _C.crc32c(payload, _C.crc32c(rest[:8])) != crc:
            raise DatabaseCorruptError(path, f"record at byte {offset}: checksum mismatch (the log is damaged)")
        if length < _PAYLOAD_HEAD.size:
            raise DatabaseCorruptError(path, f"record at byte {offset}: payload of {length} bytes is too short")
        lsn, kind, meta_len = _PAYLOAD_HEAD.unpack_from(payload, 0)
        if lsn != expected_lsn:
            raise DatabaseCorruptError(path, f"record at byte {offset}: sequence number {lsn}, expected {expected_lsn}")
        try:
            meta_end = _PAYLOAD_HEAD.size + meta_len
            meta = json.loads(bytes(payload[_PAYLOAD_HEAD.size : meta_end]))
            records.append(Record(lsn, RecordKind(kind), meta, payload[meta_end:]))
        except (ValueError, UnicodeDecodeError) as exc:
            raise DatabaseCorruptError(path, f"record at byte {offset}: unreadable ({exc})") from None
        expected_lsn += 1
        offset += end
    return LogContents(base_lsn, records, offset, len(data) - offset)


class LogWriter:
    """Appends records to an existing log; each append is durable (fdatasync) when it returns."""

    def __init__(self, path: Path, valid_end: int) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY)
        try:
            if os.fstat(self._fd).st_size != valid_end:
                os.ftruncate(self._fd, valid_end)  # drop a torn tail before appending after it
                os.fsync(self._fd)
            self._end = valid_end
        except BaseException:
            os.close(self._fd)
            raise
        self._broken = False

    @property
    def size(self) -> int:
        return self._end

    def append(self, data: bytes) -> None:
        if self._broken:
            raise DatabaseError(f"{self.path}: an earlier append failed and could not be undone; reopen the database")
        try:
            os.lseek(self._fd, self._end, os.SEEK_SET)
            write_all(self._fd, data)
            os.fdatasync(self._fd)
        except BaseException:
            # Cut the partial record off so the next append does not land behind garbage.
            try:
                os.ftruncate(self._fd, self._end)
                os.fsync(self._fd)
            except OSError:
                self._broken = True
            raise
        self._end += len(data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
