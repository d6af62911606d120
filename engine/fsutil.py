"""Durable file writes: temp file, fsync, rename, fsync of the directory."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

_CHUNK = 1 << 20
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or unlink inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def waiting_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``path`` (created if missing), waiting for it; the
    kernel releases it if the holder dies. For caches whose work one process should do for all."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the file releases the lock


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write until every byte is written (os.write may write fewer)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def create_temp_beside(path: Path) -> tuple[int, Path]:
    """Create a new, empty temporary file next to ``path`` and return (open fd, its path).

    The name is unpredictable and the file is created exclusively (``O_EXCL``; an existing name,
    symlinks included, is never opened), so a symlink planted in a shared folder cannot redirect
    the write. Names look like ``.NAME.XXXXXXXX.tmp``, which the database's cleanup recognises."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the final file from other readers
    except BaseException:
        os.close(fd)
        os.unlink(name)
        raise
    return fd, Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    The caller writes the temporary file however it likes (e.g. ``faiss.write_index``): it exists
    already, created exclusively under an unpredictable name (:func:`create_temp_beside`). Readers
    see the old file or the whole new one, never a partial file; on error the temp file is removed.
    """
    target = Path(path)
    fd, tmp = create_temp_beside(target)
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | _NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to ``path`` atomically and durably."""
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | _NOFOLLOW)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)


def open_new_file(path: str | os.PathLike[str], mode: str = "wb") -> IO[Any]:
    """``path`` opened for writing from empty, for outputs that are written as they go (a JSON
    Lines log, a video): a symlink planted at the name in a shared folder is removed, never
    followed, and one planted again in between makes the open fail (``O_NOFOLLOW``)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISLNK(os.lstat(path).st_mode):
            os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW, 0o644)
    return os.fdopen(fd, mode)


def unsafe_folder(path: str | os.PathLike[str]) -> str | None:
    """Why a cache folder that does not exist yet or that we own could be written by someone else
    (None where it cannot): a folder owned by another user, or writable by the group or by all,
    lets them plant a file that we would then trust."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    if info.st_uid not in (os.getuid(), 0):
        return f"{path} belongs to another user (uid {info.st_uid})"
    if info.st_mode & 0o022:
        return f"{path} is writable by its group or by all (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def clear_for_file(path: Path) -> bool:
    """Remove whatever non-file sits at ``path`` (a directory, FIFO, socket or symlink) so a cache
    file can be written there; returns whether something was removed. Only for caches: their
    entries are disposable by definition."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISREG(mode):
        return False
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)
    else:
        path.unlink()
    return True


def read_regular_file(path: Path, limit: int) -> bytes | None:
    """The bytes of ``path`` if it is a regular file (not a FIFO, which would block, nor a link) of
    at most ``limit`` bytes; None where there is nothing usable."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)


def confined(directory: str | os.PathLike[str], name: str, what: str = "file") -> Path:
    """``directory / name`` for a ``name`` read from a manifest, a cache entry or an annotation,
    refused (ValueError) unless it stays inside ``directory``: no absolute path, no ``..``, and no
    symlink along the way that leads out.

    >>> str(confined("/data/ds", "images/a.jpg"))
    '/data/ds/images/a.jpg'
    >>> confined("/data/ds", "../etc/passwd")
    Traceback (most recent call last):
    ...
    ValueError: '../etc/passwd' leads outside /data/ds: a file name must be relative and stay in its folder
    """
    root = Path(directory)
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or "\0" in name:
        raise ValueError(f"{name!r} leads outside {root}: a {what} name must be relative and stay in its folder")
    candidate = root / name
    real_root = os.path.realpath(root)
    real = os.path.realpath(candidate)
    if os.path.commonpath([real_root, real]) != real_root:
        raise ValueError(f"{name!r} in {root} is a symlink that leads outside it, to {real}")
    return candidate


def sha256_file(path: str | os.PathLike[str], progress: Callable[[int], None] | None = None) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


def json_content_hash(body: dict[str, Any]) -> str:
    """SHA-256 of a JSON object in canonical form (sorted keys, no spaces): a manifest's self-hash."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
