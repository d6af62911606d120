"""Data and file helpers shared by the database tests and the crash-test child process."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

CRASH_DIM = 32
CRASH_BATCH = 16


def clustered(n: int, dim: int, classes: int, seed: int, spread: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """Vectors around ``classes`` random unit centres (like mask embeddings of a few classes) and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, classes, n)
    x = centres[labels] + spread * rng.normal(size=(n, dim)) / np.sqrt(dim)
    return x.astype(np.float32), labels


def crash_batch(i: int) -> np.ndarray:
    """The vectors of batch ``i`` of the crash test (deterministic, so the parent can check them)."""
    return np.random.default_rng(1000 + i).normal(size=(CRASH_BATCH, CRASH_DIM)).astype(np.float32)


def exact_topk(db_vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k cosine neighbours in float64 from the definition: (sims, positions), best first."""
    a = db_vectors.astype(np.float64)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    q = queries.astype(np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    sims = q @ a.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


def file_digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


CURATION_STATES = (  # what cycle i's classes hold after each of its steps: (keep, x, y)
    ("none", None, None, None),
    ("add", CRASH_BATCH // 2, CRASH_BATCH // 2, None),
    ("add-extra", CRASH_BATCH // 2 + 2, CRASH_BATCH // 2, None),
    ("remove", CRASH_BATCH // 2 + 2, CRASH_BATCH // 4, None),
    ("rename", CRASH_BATCH // 2 + 2, None, CRASH_BATCH // 4),
    ("merge", CRASH_BATCH // 2 + 2 + CRASH_BATCH // 4, None, None),
    ("remove-source", CRASH_BATCH // 2 + CRASH_BATCH // 4, None, None),
)


def curation_cycle(db, i: int):
    """One cycle of the curation crash test on ``db``, yielding each step's name once it returned:
    add ``keep{i}`` and ``x{i}`` (half the batch each, from ``image{i}.png``), add two more
    ``keep{i}`` from ``extra{i}.png``, remove a half of ``x{i}``'s entries, rename ``x{i}`` to
    ``y{i}``, merge ``y{i}`` into ``keep{i}``, remove the source ``extra{i}.png``."""
    half = CRASH_BATCH // 2
    ids = db.add(crash_batch(i), [f"keep{i}"] * half + [f"x{i}"] * half, sources=f"image{i}.png")
    yield "add"
    db.add(crash_batch(i)[:2] * 2, [f"keep{i}"] * 2, sources=f"extra{i}.png")
    yield "add-extra"
    db.remove_entries(ids[half : half + half // 2])
    yield "remove"
    db.rename_class(f"x{i}", f"y{i}")
    yield "rename"
    db.merge_classes(f"y{i}", f"keep{i}")
    yield "merge"
    db.remove_source(f"extra{i}.png")
    yield "remove-source"
