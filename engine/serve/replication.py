"""A serving replica's own copy of the database, kept current through calls to the owner and
never through the owner's files: for replicas on machines that share no file system with it.

The replica starts from the owner's checkpoint, shipped as one blob (``Database.copy_for_replica``
packed by :func:`~knnclip.engine.database.shipping.pack_copy`; on Ray, through the object store),
written into a directory of its own, and then asks the owner for the log records after the
sequence number it holds (``Database.records_since``), which it applies as replay does
(``Database.apply_records``). When the owner's log no longer holds them (a checkpoint emptied it),
the replica fetches the latest checkpoint again and swaps it in whole, so it never serves a state
that mixes two checkpoints. When the owner cannot be reached, the replica keeps serving the last
state it applied and says it is stale until the owner answers again.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from knnclip.engine.database import Database
from knnclip.engine.database.database import FollowResult
from knnclip.engine.database.shipping import unpack_copy
from knnclip.engine.errors import DatabaseCorruptError

__all__ = ["OwnerUnavailableError", "ShippedReplica"]

log = logging.getLogger("knnclip.serve")


class OwnerUnavailableError(Exception):
    """The owner did not answer (it died, restarts, or the network is down)."""


class ShippedReplica:
    """The database a replica searches, in ``workdir``, current to the owner's last change.

    Parameters
    ----------
    workdir : path
        The replica's own directory (created); each copy goes in a new folder under it.
    fetch_copy : callable () -> bytes
        The owner's current checkpoint, packed (raises OwnerUnavailableError when unreachable).
    fetch_records : callable (lsn) -> bytes | None
        The owner's records after ``lsn``, or None when its log no longer holds them.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        fetch_copy: Callable[[], bytes],
        fetch_records: Callable[[int], bytes | None],
        *,
        search: str = "fp32",
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._fetch_copy, self._fetch_records, self._search = fetch_copy, fetch_records, search
        self._lock = threading.Lock()
        self._copies = 0
        self.stale, self.last_error = False, ""
        self.db = self._bootstrap()

    def _bootstrap(self) -> Database:
        blob = self._fetch_copy()
        self._copies += 1
        path = unpack_copy(blob, self.workdir / f"copy-{self._copies}")
        return Database.open(path, read_only=True, search=self._search)

    def refresh(self) -> FollowResult | None:
        """Apply the owner's changes since the last refresh; None (and :attr:`stale`) when the
        owner could not be reached: the last state applied stays in use."""
        with self._lock:
            try:
                data = self._fetch_records(self.db.lsn)
                if data is not None:
                    try:
                        result = self.db.apply_records(data)
                    except DatabaseCorruptError as exc:
                        log.warning("%s; fetching the owner's checkpoint again", exc)
                        data = None
                if data is None:
                    result = self._swap(self._bootstrap())
            except OwnerUnavailableError as exc:
                self.stale, self.last_error = True, str(exc)
                return None
            self.stale, self.last_error = False, ""
            return result

    def _swap(self, fresh: Database) -> FollowResult:
        old, self.db = self.db, fresh
        old.close()
        shutil.rmtree(old.path, ignore_errors=True)
        return FollowResult(0, sum(f.stat().st_size for f in fresh.path.iterdir()), True, fresh.lsn)

    def close(self) -> None:
        with self._lock:
            self.db.close()
