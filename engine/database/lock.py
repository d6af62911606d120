"""One writer per database directory: an exclusive flock on ``LOCK`` held while the writer is open.

flock locks belong to the open file, so the kernel releases them when the process dies, even by
SIGKILL: a crashed writer never leaves the database locked.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from knnclip.engine.errors import DatabaseLockedError

LOCK_NAME = "LOCK"


class WriterLock:
    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_NAME
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise DatabaseLockedError(
                f"{directory}: another writer (pid {holder}) has this database open; close it first, "
                "or open this one with read_only=True"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1
