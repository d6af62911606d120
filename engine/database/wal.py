"""The write-ahead log: every change is appended and fsynced here before it touches the index.

File layout (little-endian)::

    header   magic "KNNCWAL2" (8 B) | database uuid (16 B) | base lsn u64
    record   payload length u64 | CRC-32C of the length u32 | CRC-32C of (length + payload) u32 | payload
    payload  lsn u64 | kind u8 | meta length u32 | meta (UTF-8 JSON) | body (raw arrays)

Log sequence numbers (lsn) count up by one from ``base lsn + 1``.

A torn tail is what a crash leaves of the last append, whose write never returned: bytes after
the last complete record that hold no complete record head, or only zeros after a partial one
(what a file system shows for a size extended before the data reached the disk), or a head whose
own checksum is right and whose length runs past the end of the file. The head checksum is what
tells a torn write from damage: a flipped bit in a length field fails it, so a damaged record is
reported as corruption, never taken for a tail (which would silently drop every record after
it). Any other mismatch is corruption too: the records after it may depend on it.

Logs of format 1 (``KNNCWAL1``, without the head checksum) are still read; the database
checkpoints them into format 2 when a writer opens one.
"""

from __future__ import annotations

import enum
import errno
import json
import os
import struct
import time
import uuid as uuid_mod
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knnclip import _C
from knnclip.engine.errors import DatabaseCorruptError
from knnclip.engine.fsutil import atomic_write_bytes, write_all

MAGIC = b"KNNCWAL2"
MAGIC_V1 = b"KNNCWAL1"
_HEADER = struct.Struct("<8s16sQ")
_RECORD_HEAD = struct.Struct("<QII")  # length, CRC of the length, CRC of length + payload
_RECORD_HEAD_V1 = struct.Struct("<QI")
_PAYLOAD_HEAD = struct.Struct("<QBI")
HEADER_BYTES = _HEADER.size


class RecordKind(enum.IntEnum):
    ADD = 1  # meta: first_id, n, dim, classes (new or changed ClassInfo); body: class ids int64[n], float32[n, dim]
    REMOVE_CLASS = 2  # meta: class_id
    PUT_CLASS = 3  # meta: class (ClassInfo JSON)
    REMOVE_ENTRIES = 4  # meta: n; body: entry ids int64[n]
    MERGE_CLASSES = 5  # meta: source (class id), class (the target's ClassInfo JSON, source's names added)


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
    version: int = 2


def encode_record(lsn: int, kind: RecordKind, meta: dict[str, Any], *body: bytes | memoryview) -> bytes:
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    payload = b"".join([_PAYLOAD_HEAD.pack(lsn, int(kind), len(meta_bytes)), meta_bytes, *body])
    length = struct.pack("<Q", len(payload))
    head_crc = _C.crc32c(length)
    return length + struct.pack("<II", head_crc, _C.crc32c(payload, head_crc)) + payload


def create_log(path: Path, db_uuid: uuid_mod.UUID, base_lsn: int) -> None:
    """Write an empty log (header only) atomically, replacing any log at ``path``."""
    atomic_write_bytes(path, _HEADER.pack(MAGIC, db_uuid.bytes, base_lsn))


def read_log(path: Path, db_uuid: uuid_mod.UUID) -> LogContents:
    """Parse the whole log; raise DatabaseCorruptError naming ``path`` on anything but a torn tail."""
    try:
        data = memoryview(path.read_bytes())
    except FileNotFoundError:
        raise DatabaseCorruptError(path, "the write-ahead log is missing") from None
    base_lsn, version = _check_header(path, data, db_uuid)
    records, end = _parse_records(path, data[HEADER_BYTES:], HEADER_BYTES, base_lsn + 1, version)
    return LogContents(base_lsn, records, end, len(data) - end, version)


def _check_header(path: Path, data: memoryview | bytes, db_uuid: uuid_mod.UUID) -> tuple[int, int]:
    """The base lsn and format version of a log that starts with ``data``."""
    if len(data) < HEADER_BYTES:
        raise DatabaseCorruptError(path, f"write-ahead log header is truncated ({len(data)} of {HEADER_BYTES} bytes)")
    magic, file_uuid, base_lsn = _HEADER.unpack_from(data, 0)
    if magic not in (MAGIC, MAGIC_V1):
        raise DatabaseCorruptError(path, f"not a knnclip write-ahead log (starts with {bytes(magic)!r})")
    if file_uuid != db_uuid.bytes:
        raise DatabaseCorruptError(
            path, f"write-ahead log belongs to database {uuid_mod.UUID(bytes=file_uuid)}, not {db_uuid}"
        )
    return int(base_lsn), 2 if magic == MAGIC else 1


def _parse_records(
    path: Path, data: memoryview, start: int, expected_lsn: int, version: int
) -> tuple[list[Record], int]:
    """The whole records at the front of ``data`` (the log's bytes from offset ``start``), the
    first numbered ``expected_lsn``, and the offset where they end (a torn tail may follow)."""
    head = _RECORD_HEAD if version == 2 else _RECORD_HEAD_V1
    records: list[Record] = []
    pos = 0
    while pos < len(data):
        offset = start + pos
        rest = data[pos:]
        if len(rest) < head.size or not any(rest[: head.size]):
            # A partial record head, or the zeros a file system leaves when the size was
            # extended but the data never reached the disk.
            if any(rest) and len(rest) >= head.size:
                raise DatabaseCorruptError(path, f"record at byte {offset}: zero length followed by data")
            break
        if version == 2:
            length, head_crc, crc = head.unpack_from(rest, 0)
            if _C.crc32c(rest[:8]) != head_crc:
                if _partial_head_then_zeros(rest, head.size):
                    break  # torn tail: the head itself was cut short
                raise DatabaseCorruptError(
                    path, f"record at byte {offset}: the record head is damaged (its checksum does not match)"
                )
            seed = head_crc
        else:
            length, crc = head.unpack_from(rest, 0)
            seed = _C.crc32c(rest[:8])
        end = head.size + length
        if end > len(rest):
            break  # torn tail: the write was cut short
        payload = rest[head.size : end]
        if _C.crc32c(payload, seed) != crc:
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
        pos += end
    return records, start + pos


def parse_records(data: bytes | memoryview, first_lsn: int, source: Path) -> list[Record]:
    """The records of ``data``, encoded as the log encodes them (what :func:`encode_record` gave),
    the first numbered ``first_lsn``; anything cut short or damaged is a DatabaseCorruptError
    naming ``source`` (shipped records must arrive whole)."""
    view = memoryview(data)
    records, end = _parse_records(source, view, 0, first_lsn, 2)
    if end != len(view):
        raise DatabaseCorruptError(source, f"records cut short at byte {end} of {len(view)}")
    return records


class FellBehindError(Exception):
    """The records a follower needs next are no longer in any log it can read (two checkpoints
    replaced the log since it last read, or the database itself was replaced): it must load the
    latest checkpoint instead."""


class LogFollower:
    """Reads what a writer appends to the log at ``path`` after record ``last_lsn`` (which ends at
    byte ``offset``), each call reading only the new bytes.

    The log file stays open between calls: a checkpoint replaces the log by renaming a new one
    over it, and the open file still holds the old log's last records, so the follower reads
    them first and then moves on to the new log without missing any.
    """

    def __init__(self, path: Path, db_uuid: uuid_mod.UUID, base_lsn: int, offset: int, last_lsn: int) -> None:
        self.path, self._uuid = path, db_uuid
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        self._finalizer = weakref.finalize(self, os.close, self._fd)
        try:
            header = os.pread(self._fd, HEADER_BYTES, 0)
            self.base_lsn, self._version = _check_header(path, header, db_uuid)
        except DatabaseCorruptError as exc:
            self._finalizer()
            raise FellBehindError(f"the log is no longer this database's: {exc}") from None
        if self.base_lsn != base_lsn:
            # The log read at open was replaced since: this one follows on only if it starts
            # where the reader stands.
            if self.base_lsn != last_lsn:
                self._finalizer()
                raise FellBehindError(f"{path} starts after record {self.base_lsn}; the reader stands at {last_lsn}")
            offset = HEADER_BYTES
        self.offset, self.last_lsn = offset, last_lsn

    def read(self) -> tuple[list[Record], int]:
        """The records appended since the last call (in order) and the bytes read to find them.
        Raises FellBehindError when they cannot all be read, DatabaseCorruptError on damage."""
        records, read = self._read_open_file()
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return records, read  # a checkpoint is between removing and renaming: next time
        if current.st_ino == os.fstat(self._fd).st_ino:
            return records, read
        # A checkpoint replaced the log: the old one is complete (the writer appends only to
        # the new one from now on), so read its last records, then move to the new one.
        more, more_read = self._read_open_file()
        records += more
        read += more_read
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            header = os.pread(fd, HEADER_BYTES, 0)
            try:
                base_lsn, version = _check_header(self.path, header, self._uuid)
            except DatabaseCorruptError as exc:
                raise FellBehindError(f"the log was replaced by another database's: {exc}") from None
            if base_lsn > self.last_lsn:
                raise FellBehindError(
                    f"{self.path} now starts after record {base_lsn}; this follower has read up to {self.last_lsn}"
                )
        except BaseException:
            os.close(fd)
            raise
        self._finalizer()
        self._fd, self._finalizer = fd, weakref.finalize(self, os.close, fd)
        self.base_lsn, self._version, self.offset = base_lsn, version, HEADER_BYTES
        skipped_to = self.last_lsn
        self.last_lsn = base_lsn
        more, more_read = self._read_open_file()
        return records + [r for r in more if r.lsn > skipped_to], read + more_read + HEADER_BYTES

    def _read_open_file(self) -> tuple[list[Record], int]:
        size = os.fstat(self._fd).st_size
        if size <= self.offset:
            return [], 0
        data = memoryview(os.pread(self._fd, size - self.offset, self.offset))
        records, end = _parse_records(self.path, data, self.offset, self.last_lsn + 1, self._version)
        if records:
            self.offset, self.last_lsn = end, records[-1].lsn
        return records, len(data)

    def close(self) -> None:
        self._finalizer()


def _partial_head_then_zeros(rest: memoryview, head_size: int) -> bool:
    """Whether the bytes left hold less than a record head before nothing but zeros: a head cut
    short by a crash (its bytes reached the disk only in part)."""
    nonzero = bytes(rest).rstrip(b"\0")
    return len(nonzero) < head_size


def keep_tail_aside(path: Path, valid_end: int) -> Path | None:
    """Copy the bytes of ``path`` after ``valid_end`` (a torn tail about to be cut) to a file of
    their own beside it, ``wal.log.torn-<offset>-<utc time>``; returns it (None if there is none)."""
    size = path.stat().st_size
    if size <= valid_end:
        return None
    with open(path, "rb") as f:
        f.seek(valid_end)
        tail = f.read()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.torn-{valid_end}-{stamp}")
    atomic_write_bytes(aside, tail)
    return aside


class LogWriter:
    """Appends records to an existing log; each append is durable (fdatasync) when it returns.

    A torn tail after ``valid_end`` is cut before the first append, its bytes kept aside first
    (:func:`keep_tail_aside`)."""

    def __init__(self, path: Path, valid_end: int) -> None:
        self.path = path
        self.tail_kept: Path | None = None
        self._fd = os.open(path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            if os.fstat(self._fd).st_size != valid_end:
                self.tail_kept = keep_tail_aside(path, valid_end)
                os.ftruncate(self._fd, valid_end)  # drop a torn tail before appending after it
                os.fsync(self._fd)
            self._end = valid_end
        except BaseException:
            os.close(self._fd)
            raise
        self._broken = False
        self._finalizer = weakref.finalize(self, os.close, self._fd)

    @property
    def size(self) -> int:
        return self._end

    @property
    def broken(self) -> bool:
        """An append failed and its partial record could not be cut off: nothing more is written."""
        return self._broken

    def append(self, data: bytes) -> None:
        if self._broken:
            raise OSError(
                errno.EIO, f"an earlier append to {self.path} failed and could not be undone; reopen the database"
            )
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
            self._fd = -1
            self._finalizer()
