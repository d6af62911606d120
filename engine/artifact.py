"""Exported artefacts (ONNX models, TensorRT engines): a directory of payload files plus a
``manifest.json`` naming each file with its size and SHA-256, the model config, the input and
output signature, and how the artefact was made and verified.

The manifest carries a SHA-256 of its own content; :func:`read_manifest` checks it, the format
version, the kind, and (by default) every payload file, so a truncated download, a flipped byte
or a file swapped from another export is caught before a session is created.

A manifest is read into a typed :class:`Manifest` (:meth:`Manifest.from_json`): the fields every
artefact has, and per kind what the run time reads (:class:`FCCLIPImageManifest`,
:class:`FCCLIPTextManifest`, :class:`DINOv2Manifest`). A missing or mistyped key is an
``ArtifactCorruptError`` naming it; :func:`write_manifest` builds the same object before it writes,
so an exporter cannot publish a manifest the run time would refuse.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
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
KIND_FCCLIP_IMAGE = "fcclip-image"
KIND_FCCLIP_TEXT = "fcclip-text"
KIND_DINOV2 = "dinov2-keys"
_FIX = "re-export the artefact"


class _Reader:
    """Typed reads of one JSON object of a manifest, each failure an ``ArtifactCorruptError``
    naming the key (``where`` says whose key it is)."""

    def __init__(self, body: Any, path: Path, where: str = "manifest") -> None:
        if not isinstance(body, Mapping):
            raise ArtifactCorruptError(path, f"{where} is not a JSON object; {_FIX}")
        self.body, self.path, self.where = body, path, where

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        """``body[key]``, checked to be a ``kind`` (``default`` where absent, if given)."""
        if key not in self.body:
            if default is not ...:
                return default
            raise ArtifactCorruptError(self.path, f"{self.where} lacks {key!r}; {_FIX}")
        value = self.body[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # JSON numbers: an int is a float where a float is wanted, a bool is neither
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            wanted = " or ".join(k.__name__ for k in kinds)
            raise ArtifactCorruptError(
                self.path, f"{self.where} {key!r} is {type(value).__name__}, expected {wanted}; {_FIX}"
            )
        return value

    def sub(self, key: str) -> _Reader:
        return _Reader(self.get(key, dict), self.path, f"{self.where} {key!r}")

    def floats(self, key: str, n: int | None = None) -> tuple[float, ...]:
        values = self.get(key, list)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) or (
            n is not None and len(values) != n
        ):
            count = f"{n} " if n is not None else ""
            raise ArtifactCorruptError(self.path, f"{self.where} {key!r} is not a list of {count}numbers; {_FIX}")
        return tuple(float(v) for v in values)

    def size(self, key: str) -> tuple[int, int] | None:
        value = self.get(key, (list, type(None)), None)
        if value is None:
            return None
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            raise ArtifactCorruptError(self.path, f"{self.where} {key!r} is not [height, width]; {_FIX}")
        return int(value[0]), int(value[1])


@dataclass(frozen=True)
class FileRecord:
    """One payload file: its name in the artefact's folder, its size and SHA-256."""

    name: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class TensorEntry:
    """A graph input or output: its name, dtype, and shape (ints, or names of dynamic axes)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def from_json(cls, body: Any, path: Path, where: str) -> TensorEntry:
        r = _Reader(body, path, where)
        shape = r.get("shape", list)
        if not all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in shape):
            raise ArtifactCorruptError(path, f"{where} 'shape' holds something other than sizes and axis names; {_FIX}")
        return cls(r.get("name", str), r.get("dtype", str), tuple(shape))


@dataclass(frozen=True)
class Manifest:
    """The manifest of an artefact, typed. ``body`` is the JSON as read (without its self-hash):
    the digests and engine keys hash it, and the torch side reads the model config from it."""

    kind: str
    files: dict[str, FileRecord]
    inputs: tuple[TensorEntry, ...]
    outputs: tuple[TensorEntry, ...]
    precision: str
    weights_sha256: str | None
    input_size: tuple[int, int] | None  # None: a graph with dynamic spatial axes
    model: dict[str, Any]  # architecture and config: what the torch side rebuilds the module from
    body: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, body: Any, path: str | os.PathLike[str]) -> Manifest:
        """The typed manifest of ``body``, the subclass its kind names; ``path`` (the manifest
        file) is what an ``ArtifactCorruptError`` names."""
        path = Path(path)
        r = _Reader(body, path)
        kind = r.get("kind", str)
        files_r = r.sub("files")
        files = {}
        for role in files_r.body:
            f = files_r.sub(role)
            files[str(role)] = FileRecord(f.get("name", str), f.get("bytes", int), f.get("sha256", str))
        common: dict[str, Any] = {
            "kind": kind,
            "files": files,
            "inputs": tuple(TensorEntry.from_json(e, path, "an input") for e in r.get("inputs", list)),
            "outputs": tuple(TensorEntry.from_json(e, path, "an output") for e in r.get("outputs", list)),
            "precision": r.get("precision", str, "fp32"),
            "weights_sha256": r.get("weights_sha256", (str, type(None)), None),
            "input_size": r.size("input_size"),
            "model": dict(r.get("model", dict, {})),
            "body": dict(body),
        }
        kinds: dict[str, type[Manifest]] = {
            KIND_FCCLIP_IMAGE: FCCLIPImageManifest,
            KIND_FCCLIP_TEXT: FCCLIPTextManifest,
            KIND_DINOV2: DINOv2Manifest,
        }
        subclass = kinds.get(kind)
        if subclass is None:
            return cls(**common)
        return subclass(**common, **subclass.kind_fields(r))

    @classmethod
    def kind_fields(cls, r: _Reader) -> dict[str, Any]:
        return {}

    def to_json(self) -> dict[str, Any]:
        return dict(self.body)


@dataclass(frozen=True)
class FCCLIPImageManifest(Manifest):
    """FC-CLIP's image graph: its preprocessing (0..255-scale mean and std, FC-CLIP's test sizes),
    the head's constants and inference thresholds, the classes it was trained on."""

    pixel_mean: tuple[float, ...] = ()
    pixel_std: tuple[float, ...] = ()
    min_size: int = 0
    max_size: int = 0
    in_vocab_logit_scale: float = 0.0
    clip_logit_scale: float = 0.0
    void_embedding: tuple[float, ...] = ()
    alpha: float = 0.0
    beta: float = 0.0
    object_mask_threshold: float = 0.0
    overlap_threshold: float = 0.0
    seen_names: frozenset[str] = frozenset()
    sampling: str = "gather"

    @classmethod
    def kind_fields(cls, r: _Reader) -> dict[str, Any]:
        pre, head, inference = r.sub("preprocessing"), r.sub("head"), r.sub("inference")
        seen = r.get("seen_names", list, [])
        if not all(isinstance(n, str) for n in seen):
            raise ArtifactCorruptError(r.path, f"manifest 'seen_names' holds something other than names; {_FIX}")
        return {
            "pixel_mean": pre.floats("mean", 3),
            "pixel_std": pre.floats("std", 3),
            "min_size": pre.get("min_size_test", int),
            "max_size": pre.get("max_size_test", int),
            "in_vocab_logit_scale": float(head.get("in_vocab_logit_scale", float)),
            "clip_logit_scale": float(head.get("clip_logit_scale", float)),
            "void_embedding": head.floats("void_embedding"),
            "alpha": float(inference.get("alpha", float)),
            "beta": float(inference.get("beta", float)),
            "object_mask_threshold": float(inference.get("object_mask_threshold", float)),
            "overlap_threshold": float(inference.get("overlap_threshold", float)),
            "seen_names": frozenset(seen),
            "sampling": r.get("sampling", str, "gather"),
        }


@dataclass(frozen=True)
class FCCLIPTextManifest(Manifest):
    """CLIP's text graph: its tokenizer (``{"kind", "context_length", ...}``) and prompt templates."""

    tokenizer: dict[str, Any] = field(default_factory=dict)
    context_length: int = 0
    templates: tuple[str, ...] = ()

    @classmethod
    def kind_fields(cls, r: _Reader) -> dict[str, Any]:
        tokenizer = r.sub("tokenizer")
        templates = r.get("templates", list)
        if not templates or not all(isinstance(t, str) for t in templates):
            raise ArtifactCorruptError(r.path, f"manifest 'templates' is not a list of prompt templates; {_FIX}")
        return {
            "tokenizer": dict(tokenizer.body),
            "context_length": tokenizer.get("context_length", int),
            "templates": tuple(templates),
        }


@dataclass(frozen=True)
class DINOv2Manifest(Manifest):
    """DINOv2's keys graph: the normalisation of its input (0..1-scale mean and std)."""

    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @classmethod
    def kind_fields(cls, r: _Reader) -> dict[str, Any]:
        inputs = r.get("inputs", list)
        pre = _Reader(inputs[0] if inputs else None, r.path, "the first input").sub("preprocessing")
        if r.size("input_size") is None:
            raise ArtifactCorruptError(r.path, f"manifest lacks 'input_size' (DINOv2 runs at a fixed size); {_FIX}")
        return {"mean": pre.floats("mean", 3), "std": pre.floats("std", 3)}


def artifact_digest(manifest: Manifest) -> str:
    """SHA-256 over every file of the artefact (each name with its content's SHA-256): the graph
    and its external weights alike, not the manifest's timestamps."""
    files = sorted((rec.name, rec.sha256) for rec in manifest.files.values())
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(directory: str | os.PathLike[str], body: dict[str, Any]) -> Manifest:
    """Write ``manifest.json`` into ``directory`` (atomically). ``body`` holds at least ``kind``,
    ``files`` (role -> file name in ``directory``), ``inputs`` and ``outputs``, and what its kind
    needs (:class:`Manifest`); sizes and hashes of the files are added here. Returns what was
    written, typed, after checking that it reads back as the run time reads it."""
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
    manifest = json.loads(json.dumps(manifest))  # what a reader will see: JSON's types (lists, not tuples)
    typed = Manifest.from_json(manifest, directory / MANIFEST_NAME)
    manifest[_SELF_HASH] = json_content_hash(manifest)
    atomic_write_bytes(directory / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())
    return typed


def read_manifest(directory: str | os.PathLike[str], kind: str | None = None, *, verify_files: bool = True) -> Manifest:
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
    manifest = Manifest.from_json(body, path)
    if kind is not None and manifest.kind != kind:
        raise ArtifactCorruptError(path, f"this artefact is a {manifest.kind!r}, not a {kind!r}")
    for role, record in manifest.files.items():
        try:  # a name read from the manifest never leads outside the artefact's directory
            file = confined(directory, record.name, "payload file")
        except ValueError as exc:
            raise ArtifactCorruptError(path, f"{exc}; {fix}") from None
        if not file.is_file():
            raise ArtifactCorruptError(file, f"missing ({role} of this artefact); {fix}")
        size = file.stat().st_size
        if size != record.bytes:
            raise ArtifactCorruptError(file, f"{size} bytes, the manifest says {record.bytes} (truncated?); {fix}")
        if verify_files and sha256_file(file) != record.sha256:
            raise ArtifactCorruptError(file, f"SHA-256 differs from the manifest (damaged or replaced); {fix}")
    return manifest
