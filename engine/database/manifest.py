"""manifest.json: what a database directory holds, checked before anything else is read.

It names the checkpoint files with their sizes and SHA-256, the log sequence number the
checkpoint includes, the index spec and the vocabulary, and carries a SHA-256 of its own
content, so a flipped byte anywhere is caught.
"""

from __future__ import annotations

import json
import re
import uuid as uuid_mod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knnclip.engine.database.indexes import IndexSpec
from knnclip.engine.database.vocabulary import Vocabulary
from knnclip.engine.errors import DatabaseCorruptError
from knnclip.engine.fsutil import atomic_write_bytes, json_content_hash
from knnclip.engine.version import __version__

FORMAT = "knnclip-database"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_SELF_HASH = "manifest_sha256"


@dataclass(frozen=True)
class FileRecord:
    name: str
    bytes: int
    sha256: str


@dataclass
class Manifest:
    uuid: uuid_mod.UUID
    dim: int
    metric: str
    index: IndexSpec
    trained: bool
    vocabulary: Vocabulary
    entries: int
    next_entry_id: int
    checkpoint_lsn: int
    generation: int
    files: dict[str, FileRecord]
    created: str
    extra: dict[str, Any] = field(default_factory=dict)  # informative only: counts, versions, time

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "uuid": str(self.uuid),
            "dim": self.dim,
            "metric": self.metric,
            "index": self.index.to_json(),
            "trained": self.trained,
            "vocabulary": self.vocabulary.to_json(),
            "entries": self.entries,
            "next_entry_id": self.next_entry_id,
            "checkpoint_lsn": self.checkpoint_lsn,
            "generation": self.generation,
            "files": {k: {"name": f.name, "bytes": f.bytes, "sha256": f.sha256} for k, f in self.files.items()},
            "created": self.created,
            "knnclip_version": __version__,
            **self.extra,
        }

    def write(self, directory: Path) -> None:
        body = self.to_json()
        body[_SELF_HASH] = json_content_hash(body)
        atomic_write_bytes(directory / MANIFEST_NAME, (json.dumps(body, indent=1) + "\n").encode())

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = directory / MANIFEST_NAME
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise DatabaseCorruptError(path, "missing: this directory is not a knnclip database") from None
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise DatabaseCorruptError(path, "not a knnclip database manifest (not JSON)") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise DatabaseCorruptError(path, f"not a knnclip database manifest (format is not {FORMAT!r})")
        version = body.get("format_version")
        if version != FORMAT_VERSION:
            raise DatabaseCorruptError(
                path,
                f"database format version {version!r}; this knnclip ({__version__}) reads version {FORMAT_VERSION}. "
                "Open it with the knnclip that wrote it, or rebuild the database.",
            )
        stored = body.pop(_SELF_HASH, None)
        if stored != json_content_hash(body):
            raise DatabaseCorruptError(path, "manifest checksum mismatch (the file was edited or damaged)")
        try:
            known = {
                "format",
                "format_version",
                "uuid",
                "dim",
                "metric",
                "index",
                "trained",
                "vocabulary",
                "entries",
                "next_entry_id",
                "checkpoint_lsn",
                "generation",
                "files",
                "created",
                "knnclip_version",
            }
            return cls(
                uuid=uuid_mod.UUID(body["uuid"]),
                dim=int(body["dim"]),
                metric=str(body["metric"]),
                index=IndexSpec.from_json(body["index"]),
                trained=bool(body["trained"]),
                vocabulary=Vocabulary.from_json(body["vocabulary"]),
                entries=int(body["entries"]),
                next_entry_id=int(body["next_entry_id"]),
                checkpoint_lsn=int(body["checkpoint_lsn"]),
                generation=int(body["generation"]),
                files={k: _file_record(path, k, f) for k, f in body["files"].items()},
                created=str(body["created"]),
                extra={k: v for k, v in body.items() if k not in known},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DatabaseCorruptError(path, f"manifest field missing or malformed: {exc}") from None


# The only files a manifest may name: this directory's checkpoint generations. A name read from
# the file is never trusted to stay inside the directory (the checksum is no signature: anyone
# can recompute it), so ``../outside/index.faiss`` or an absolute path is corruption.
_FILE_NAMES = {
    "index": re.compile(r"index\.\d{6}\.faiss"),
    "entries": re.compile(r"entries\.\d{6}\.npy"),
    "provenance": re.compile(r"provenance\.\d{6}\.npz"),
    "store-ranges": re.compile(r"store-ranges\.\d{6}\.npy"),
}
# The re-rank store's segments: keys store-0, store-1, ... in row order.
_SEGMENT_KEY = re.compile(r"store-\d+")
_SEGMENT_NAME = re.compile(r"store\.\d{6}\.npy")


def _file_record(path: Path, key: str, f: Any) -> FileRecord:
    pattern = _SEGMENT_NAME if _SEGMENT_KEY.fullmatch(key) else _FILE_NAMES.get(key)
    if pattern is None:
        raise DatabaseCorruptError(path, f"lists an unknown file {key!r}")
    name = str(f["name"])
    if not pattern.fullmatch(name):
        raise DatabaseCorruptError(
            path, f"names the {key} file {name!r}; only {pattern.pattern} inside the database directory is allowed"
        )
    return FileRecord(name, int(f["bytes"]), str(f["sha256"]))
