"""Exported artefacts (ONNX models, TensorRT engines): a directory of payload files plus a
``manifest.json`` naming each file with its size and SHA-256, the model config, the input and
output signature, and how the artefact was made and verified.

The manifest carries a SHA-256 of its own content; :func:`read_manifest` checks it, the format
version, the kind, and (by default) every payload file, so a truncated download, a flipped byte
or a file swapped from another export is caught before a session is created.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from knnclip.engine.errors import ArtifactCorruptError
from knnclip.engine.fsutil import atomic_write_bytes, confined, json_content_hash, sha256_file
from knnclip.engine.version import __version__

# The most prompts one call of a text graph is given (the text bank's batch); the TensorRT
# profile of the graph's ``texts`` axis runs up to it.
TEXT_BATCH = 256

FORMAT = "knnclip-artifact"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_SELF_HASH = "manifest_sha256"
_REQUIRED = ("kind", "files", "inputs", "outputs")


def artifact_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 over every file of the artefact (each name with its content's SHA-256): the graph
    and its external weights alike, not the manifest's timestamps."""
    files = sorted((str(rec["name"]), str(rec["sha256"])) for rec in manifest["files"].values())
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(directory: str | os.PathLike[str], body: dict[str, Any]) -> dict[str, Any]:
    """Write ``manifest.json`` into ``directory`` (atomically). ``body`` holds at least ``kind``,
    ``files`` (role -> file name in ``directory``), ``inputs`` and ``outputs``; sizes and hashes
    of the files are added here. Returns what was written."""
    directory = Path(directory)
    missing = [k for k in _REQUIRED if k not in body]
    if missing:
        raise ValueError(f"artifact manifest lacks {missing}")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **body,
        "files": {role: {"name": name, **file_record(directory / name)} for role, name in body["files"].items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "knnclip_version": __version__,
    }
    manifest[_SELF_HASH] = json_content_hash(manifest)
    atomic_write_bytes(directory / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def read_manifest(
    directory: str | os.PathLike[str], kind: str | None = None, *, verify_files: bool = True
) -> dict[str, Any]:
    """The manifest of an artefact directory, checked; raises ``ArtifactCorruptError`` naming the
    file at fault and the fix. ``verify_files`` re-hashes every payload file (seconds for GBs)."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    fix = "re-export the artefact"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactCorruptError(path, f"missing: {directory} is not a knnclip artefact directory") from None
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ArtifactCorruptError(path, f"not JSON; {fix}") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise ArtifactCorruptError(path, f"not a knnclip artefact manifest (format is not {FORMAT!r})")
    if body.get("format_version") != FORMAT_VERSION:
        raise ArtifactCorruptError(
            path, f"artefact format version {body.get('format_version')!r}; this knnclip reads {FORMAT_VERSION}: {fix}"
        )
    stored = body.pop(_SELF_HASH, None)
    if stored != json_content_hash(body):
        raise ArtifactCorruptError(path, f"manifest checksum mismatch (edited or damaged); {fix}")
    missing = [k for k in _REQUIRED if k not in body]
    if missing:
        raise ArtifactCorruptError(path, f"manifest lacks {missing}; {fix}")
    if kind is not None and body["kind"] != kind:
        raise ArtifactCorruptError(path, f"this artefact is a {body['kind']!r}, not a {kind!r}")
    if not isinstance(body["files"], dict):
        raise ArtifactCorruptError(path, f"manifest 'files' is not an object; {fix}")
    for role, record in body["files"].items():
        if not isinstance(record, dict) or not {"name", "bytes", "sha256"} <= set(record):
            raise ArtifactCorruptError(path, f"manifest entry of {role!r} is malformed; {fix}")
        try:  # a name read from the manifest never leads outside the artefact's directory
            file = confined(directory, str(record["name"]), "payload file")
        except ValueError as exc:
            raise ArtifactCorruptError(path, f"{exc}; {fix}") from None
        if not file.is_file():
            raise ArtifactCorruptError(file, f"missing ({role} of this artefact); {fix}")
        size = file.stat().st_size
        if size != record["bytes"]:
            raise ArtifactCorruptError(file, f"{size} bytes, the manifest says {record['bytes']} (truncated?); {fix}")
        if verify_files and sha256_file(file) != record["sha256"]:
            raise ArtifactCorruptError(file, f"SHA-256 differs from the manifest (damaged or replaced); {fix}")
    return body
