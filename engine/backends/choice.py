"""``backend="auto"`` on the CPU: ONNX Runtime or OpenVINO, whichever runs this artefact faster here.

Both run the same ONNX graph in fp32 (they agree to about 1e-5 relative L2), so the choice is one
of speed alone, and speed depends on the CPU, the thread count, the runtimes' versions and the
graph. So it is measured, not guessed: the first ``auto`` open of an artefact on a machine opens
each candidate, times it on a sample input (batch 1; a warm-up call, then the fastest of at least
three), keeps the faster and records the timings in the engine cache (``backend-choice/KEY.json``;
KEY covers every file of the artefact, the CPU, the threads it may use, the thread settings and the
runtimes' versions). Later opens read the record and open the winner alone; processes that start
together measure once (a lock beside the record: the others wait, then read it). A challenger must be
clearly faster (:data:`MARGIN`) to replace ONNX Runtime, so noise does not flip the choice.

bf16 is never chosen here: a lower precision changes the outputs, so it is asked for by name
(``backend="openvino-bf16"``). ``KNNCLIP_AUTO_MEASURE=0`` skips the measurement and keeps the
fixed order (ONNX Runtime, then torch).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from knnclip.engine.artifact import FCCLIPImageManifest, Manifest, artifact_digest
from knnclip.engine.backends.base import Session, TensorSpec
from knnclip.engine.errors import BackendUnavailableError, KnnclipError
from knnclip.engine.fsutil import atomic_write_bytes, read_regular_file, waiting_lock

log = logging.getLogger("knnclip.backends")
FORMAT = "knnclip-backend-choice/1"
CANDIDATES = ("onnxruntime", "openvino")  # the incumbent first
MARGIN = 0.9  # a challenger must take at most this share of the incumbent's time
TIMED_CALLS = 3
TIMED_SECONDS = 0.2
_THREAD_SETTINGS = ("KNNCLIP_ORT_THREADS", "KNNCLIP_OV_THREADS", "KNNCLIP_OPENVINO_HINT", "OMP_NUM_THREADS")
_RECORD_LIMIT = 1 << 16  # bytes


def measuring_enabled() -> bool:
    return os.environ.get("KNNCLIP_AUTO_MEASURE", "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class Choice:
    """The backend ``auto`` opens for one artefact on this machine, and the timings behind it."""

    backend: str
    ms: dict[str, float]  # the fastest timed call of each candidate that opened
    path: Path  # the record
    measured_now: bool = False  # by this open, not read from the record

    def describe(self) -> str:
        timings = ", ".join(f"{name} {ms:.1f} ms" for name, ms in sorted(self.ms.items(), key=lambda kv: kv[1]))
        how = "measured here now" if self.measured_now else "measured here before"
        return f"{self.backend} ({how}: {timings}; {self.path})"


def pick(ms: Mapping[str, float], candidates: Sequence[str] = CANDIDATES, margin: float = MARGIN) -> str:
    """The backend to keep: the first candidate (the incumbent) unless another takes at most
    ``margin`` of its time, then the fastest such one.

    >>> pick({"onnxruntime": 100.0, "openvino": 95.0})
    'onnxruntime'
    >>> pick({"onnxruntime": 100.0, "openvino": 80.0})
    'openvino'
    """
    present = [name for name in candidates if name in ms]
    if not present:
        raise ValueError("no timings to choose from")
    incumbent = present[0]
    challengers = [name for name in present[1:] if ms[name] <= margin * ms[incumbent]]
    return min(challengers, key=lambda name: ms[name]) if challengers else incumbent


def machine_key(manifest: Manifest, candidates: Sequence[str]) -> dict[str, Any]:
    """Everything the timings depend on: the artefact's files, the CPU, the threads, the runtimes."""
    from knnclip.engine.info import cpu_name

    try:
        usable_cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable_cpus = os.cpu_count() or 1
    versions: dict[str, str | None] = {}
    for name in candidates:  # the modules' own versions: onnxruntime-gpu installs the module onnxruntime
        try:
            versions[name] = str(importlib.import_module(name).__version__)
        except Exception:  # noqa: BLE001 - missing or broken: that candidate will not open either
            versions[name] = None
    return {
        "artifact": artifact_digest(manifest),
        "cpu": cpu_name(),
        "usable_cpus": usable_cpus,
        "settings": {name: os.environ.get(name) for name in _THREAD_SETTINGS},
        "versions": versions,
    }


RECORDS_FOLDER = "backend-choice"  # in the engine cache, one JSON record per artefact and machine


def record_path(cache_root: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return Path(cache_root) / RECORDS_FOLDER / f"{digest[:32]}.json"


def recorded_choices(cache_root: Path) -> dict[str, int]:
    """How many records under ``cache_root`` chose each backend ("unreadable" for a damaged one)."""
    folder = Path(cache_root) / RECORDS_FOLDER
    chosen: dict[str, int] = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:  # read_regular_file: a FIFO planted there must not block the caller
            backend = str(json.loads(read_regular_file(path, _RECORD_LIMIT) or b"")["backend"])
        except (ValueError, KeyError, TypeError):
            backend = "unreadable"
        chosen[backend] = chosen.get(backend, 0) + 1
    return chosen


def read_choice(path: Path, key: dict[str, Any], candidates: Sequence[str]) -> Choice | None:
    """The recorded choice at ``path`` if it is whole and for ``key``; None (and a warning for a
    damaged record, which is then measured again) otherwise."""
    raw = read_regular_file(path, _RECORD_LIMIT)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
        if record["format"] != FORMAT or record["key"] != key or record["backend"] not in candidates:
            raise ValueError("not a record for this artefact and machine")
        ms = {str(name): float(value) for name, value in record["ms"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("%s: unreadable backend choice (%s); measuring again", path, exc)
        return None
    return Choice(str(record["backend"]), ms, path)


def write_choice(choice: Choice, key: dict[str, Any], failed: Mapping[str, str] | None = None) -> None:
    record = {
        "format": FORMAT,
        "key": key,
        "backend": choice.backend,
        "ms": choice.ms,
        "failed": dict(failed or {}),
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    choice.path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(choice.path, (json.dumps(record, indent=1) + "\n").encode())


def sample_feed(inputs: Sequence[TensorSpec], manifest: Manifest, seed: int = 0) -> dict[str, np.ndarray]:
    """One input of each kind the session takes: the first (batch) axis 1, other named axes at the
    artefact's own input size where it has one; floats uniform in [0, 1), integers zero (a valid
    index for any embedding)."""
    rng = np.random.default_rng(seed)
    side = manifest.min_size if isinstance(manifest, FCCLIPImageManifest) else 224
    size = manifest.input_size or (side, side)
    feed = {}
    for spec in inputs:
        spatial = [i for i, dim in enumerate(spec.shape) if isinstance(dim, str) and i != 0]
        sizes = dict(zip(spatial, list(size)[-len(spatial) :], strict=True)) if 0 < len(spatial) <= len(size) else {}
        shape = [
            dim if isinstance(dim, int) else 1 if i == 0 else int(sizes.get(i, 224)) for i, dim in enumerate(spec.shape)
        ]
        if np.issubdtype(spec.dtype, np.floating):
            feed[spec.name] = rng.random(shape, dtype=np.float32).astype(spec.dtype)
        else:
            feed[spec.name] = np.zeros(shape, spec.dtype)
    return feed


def time_session(session: Session, feed: Mapping[str, np.ndarray]) -> float:
    """Milliseconds of the fastest call, after a warm-up call: at least :data:`TIMED_CALLS` calls
    and, for small models whose calls take a millisecond, at least :data:`TIMED_SECONDS` of them."""
    session.infer(feed)
    best, spent, calls = float("inf"), 0.0, 0
    while calls < TIMED_CALLS or (spent < TIMED_SECONDS and calls < 200):
        start = time.perf_counter()
        session.infer(feed)
        elapsed = time.perf_counter() - start
        best, spent, calls = min(best, elapsed), spent + elapsed, calls + 1
    return 1e3 * best


def open_fastest(
    directory: Path,
    manifest: Manifest,
    opener: Callable[[str], Session],
    cache_root: Path,
    candidates: Sequence[str] = CANDIDATES,
) -> Session | None:
    """Open the backend recorded for this artefact and machine, or measure the candidates, record
    the faster and return its session. None when no candidate opens (the caller tries its fixed
    order next). Errors in the artefact or the input (``KnnclipError``) propagate."""
    key = machine_key(manifest, candidates)
    path = record_path(cache_root, key)
    session = _open_recorded(directory, path, key, candidates, opener)
    if session is not None:
        return session
    # One process measures at a time (replicas starting together would slow each other's
    # timings down); the others wait, then read what it recorded.
    with contextlib.ExitStack() as held:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            held.enter_context(waiting_lock(path.with_suffix(".lock")))
        except OSError as exc:  # a read-only cache: measure without the lock (and without a record)
            log.warning("%s: cannot lock the backend choice (%s)", path, exc)
        session = _open_recorded(directory, path, key, candidates, opener)
        return session if session is not None else _measure(directory, manifest, opener, path, key, candidates)


def _open_recorded(
    directory: Path, path: Path, key: dict[str, Any], candidates: Sequence[str], opener: Callable[[str], Session]
) -> Session | None:
    recorded = read_choice(path, key, candidates)
    if recorded is None:
        return None
    try:
        session = opener(recorded.backend)
    except KnnclipError:
        raise
    except Exception as exc:  # noqa: BLE001 - a runtime that stopped working here since it was measured
        log.warning(
            "%s: the recorded choice %s does not open (%s: %s); measuring again",
            directory,
            recorded.backend,
            type(exc).__name__,
            exc,
        )
        return None
    session.selection = recorded.describe()
    return session


def _measure(
    directory: Path,
    manifest: Manifest,
    opener: Callable[[str], Session],
    path: Path,
    key: dict[str, Any],
    candidates: Sequence[str],
) -> Session | None:
    sessions: dict[str, Session] = {}
    ms: dict[str, float] = {}
    failed: dict[str, str] = {}  # recorded too: the same graph fails the same way on the same versions
    try:
        for name in candidates:
            try:
                session = opener(name)
            except BackendUnavailableError as exc:  # not installed here: try the next
                log.info("%s: %s is not available (%s)", directory, name, exc)
                continue
            except KnnclipError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported by the caller
                failed[name] = f"could not open: {type(exc).__name__}: {exc}"
                log.warning("%s %s; not a candidate", name, failed[name])
                continue
            sessions[name] = session
            try:
                ms[name] = time_session(session, sample_feed(session.inputs, manifest))
            except KnnclipError:
                raise
            except Exception as exc:  # noqa: BLE001 - a runtime that opens the graph but cannot run it
                failed[name] = f"could not run: {type(exc).__name__}: {exc}"
                log.warning("%s %s; not a candidate", name, failed[name])
                sessions.pop(name).close()
        if not sessions:
            return None
        choice = Choice(pick(ms, candidates), ms, path, measured_now=True)
        try:
            write_choice(choice, key, failed)
        except OSError as exc:  # a read-only or full cache: the choice holds for this open only
            log.warning("%s: could not record the backend choice (%s); it will be measured again", path, exc)
        winner = sessions.pop(choice.backend)
    finally:
        for session in sessions.values():
            session.close()
    winner.selection = choice.describe()
    return winner
