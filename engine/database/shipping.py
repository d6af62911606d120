"""A database's files as one blob, to send a replica its starting point through a channel that
is not a file system (Ray's object store): :func:`pack_copy` on the writer's side,
:func:`unpack_copy` on the replica's.

The blob is a tar of the directory's regular files (no folders, links or devices). Unpacking
accepts only the names a database directory holds, writes under a new directory of its own and
opens nothing: :meth:`Database.open` then verifies every file against the manifest's SHA-256.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

from knnclip.engine.database.database import Database
from knnclip.engine.errors import DatabaseCorruptError, DatabaseExistsError

__all__ = ["pack_copy", "unpack_copy"]

# What a database directory holds (see storage.py); anything else in a blob is refused.
_NAMES = re.compile(
    r"manifest\.json|wal\.log|(index\.\d{6}\.faiss)|((entries|store|store-ranges)\.\d{6}\.npy)|(provenance\.\d{6}\.npz)"
)


def pack_copy(database: Database, *, workdir: str | os.PathLike[str] | None = None) -> tuple[bytes, int]:
    """The current state of ``database`` as a blob, and the sequence number it holds (from
    :meth:`Database.copy_for_replica`, written to a temporary
    directory under ``workdir`` and removed)."""
    scratch = Path(tempfile.mkdtemp(prefix="knnclip-ship-", dir=workdir))
    try:
        lsn = database.copy_for_replica(scratch / "db")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for path in sorted((scratch / "db").iterdir()):
                tar.add(path, arcname=path.name, recursive=False)
        return buf.getvalue(), lsn
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def unpack_copy(blob: bytes, target: str | os.PathLike[str]) -> Path:
    """Write the files of ``blob`` into the new directory ``target`` (whole, or not at all)."""
    out = Path(target)
    if out.exists():
        raise DatabaseExistsError(f"{out} already exists; a shipped copy goes to a new directory")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
            for member in tar.getmembers():
                if not member.isreg() or not _NAMES.fullmatch(member.name):
                    raise DatabaseCorruptError(
                        Path(f"<shipped copy>/{member.name}"), "is not a file a database directory holds"
                    )
            tar.extractall(staging, filter="data")
        if not (staging / "manifest.json").is_file():
            raise DatabaseCorruptError(Path("<shipped copy>"), "holds no manifest.json")
        os.rename(staging, out)
    except tarfile.TarError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise DatabaseCorruptError(Path("<shipped copy>"), f"is not a readable tar ({exc})") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
