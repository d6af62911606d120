"""What the benchmark scripts share: the engine's one harness (``knnclip.engine.bench.harness``,
also behind ``knnclip bench``) with ``benchmarks/results/`` as the default place for results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from knnclip.engine.bench import harness
from knnclip.engine.bench.harness import (
    machine,
    peak_rss_mib,
    pyplot,
    spawn,
    summarize,
    time_calls,
    time_torch,
    timeit_interleaved,
)

__all__ = [
    "RESULTS",
    "machine",
    "pyplot",
    "rss_mib",
    "spawn",
    "summarize",
    "time_calls",
    "time_torch",
    "timeit_interleaved",
    "write_json",
    "write_text",
]
RESULTS = Path(__file__).resolve().parent / "results"

rss_mib = peak_rss_mib


def write_json(name: str, payload: dict[str, Any], directory: Path = RESULTS) -> Path:
    return harness.write_json(name, payload, directory)


def write_text(name: str, text: str, directory: Path = RESULTS) -> Path:
    return harness.write_text(name, text, directory)
