"""One writer per database directory: an exclusive flock on ``LOCK`` held while the writer is open.

flock locks belong to the open file, so the kernel releases them when the process dies, even by
SIGKILL: a crashed writer never leaves the database locked. A child forked while the lock is held
(a library's helper process: OpenVINO's telemetry forks at import) would share that open file and
keep the database locked after the writer is gone, so forked children close their copies at once.
"""

from __future__ import annotations

import fcntl
import os
import weakref
from pathlib import Path

from knnclip.engine.errors import DatabaseLockedError, DatabaseWriteError

LOCK_NAME = "LOCK"
_HELD: weakref.WeakSet[WriterLock] = weakref.WeakSet()


def _drop_inherited_locks() -> None:
    """In a forked child: close the inherited lock files (the parent's own stay open and locked)."""
    for lock in list(_HELD):
        lock.close_inherited()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


class WriterLock:
    """The writer's lock; released by :meth:`release`, or when the object is garbage-collected
    (a writer dropped without ``close()`` does not keep the database locked for the rest of the
    process)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_NAME
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            raise DatabaseWriteError(self.path, "open the database for writing", exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            who = (
                "another writer in this process (another Database object) has this database open"
                if holder == str(os.getpid())
                else f"another writer (pid {holder}) has this database open"
            )
            raise DatabaseLockedError(
                f"{directory}: {who}; close it first, or open this one with read_only=True"
            ) from None
        self._fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)  # closing the file releases the flock
        _HELD.add(self)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            self.release()
            raise DatabaseWriteError(self.path, "open the database for writing", exc) from None

    def release(self) -> None:
        if self._fd >= 0:
            self._fd = -1
            self._finalizer()

    def close_inherited(self) -> None:
        """In a forked child: close this process's copy of the lock file without releasing the
        lock (the parent's descriptor still holds it)."""
        if self._fd >= 0:
            self._finalizer.detach()
            os.close(self._fd)
            self._fd = -1
