"""Progress of long commands: tqdm bars on a terminal, and without one (a log file, CI, a pipe)
a plain line on standard error every few seconds, so long work never looks hung.

``KNNCLIP_PROGRESS_SECONDS`` sets the interval of the plain lines (default 5; 0 prints every update).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")
Progress = Callable[[int, int], None]


def interval() -> float:
    try:
        return max(0.0, float(os.environ.get("KNNCLIP_PROGRESS_SECONDS", "5")))
    except ValueError:
        return 5.0


def _tqdm() -> Any:
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


class ProgressLines:
    """A ``(done, total)`` callback writing ``label: done/total unit (pct), rate, elapsed`` at
    most every :func:`interval` seconds, and once more at the end; ``total`` may be 0 (unknown)."""

    def __init__(self, label: str, unit: str = "image", every: float | None = None) -> None:
        self.label, self.unit = label, unit
        self.every = interval() if every is None else every
        self.start = time.monotonic()
        self.last = float("-inf")

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        finished = total > 0 and done >= total
        if not finished and now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.start
        count = f"{done}/{total} {self.unit}s ({100 * done / total:.0f}%)" if total > 0 else f"{done} {self.unit}s"
        rate = f", {done / elapsed:.1f}/s" if elapsed > 0 and done else ""
        print(f"{self.label}: {count}{rate}, {elapsed:.0f} s", file=sys.stderr, flush=True)


def progress_callback(label: str, quiet: bool, unit: str = "image") -> Progress | None:
    """A tqdm bar on a terminal, :class:`ProgressLines` otherwise; None when ``quiet``."""
    if quiet:
        return None
    tqdm = _tqdm()
    if tqdm is None:
        return ProgressLines(label, unit)
    bar = tqdm(desc=label, unit=unit)

    def update(done: int, total: int) -> None:
        bar.total = total or None
        bar.n = done
        bar.refresh()
        if total and done >= total:
            bar.close()

    return update


def progress_items(items: list[T], label: str, quiet: bool, unit: str = "image") -> Iterable[T]:
    """``items``, reporting progress through :func:`progress_callback` as they are consumed."""
    if quiet:
        return items
    tqdm = _tqdm()
    if tqdm is not None:
        return tqdm(items, desc=label, unit=unit)
    return _reporting(items, ProgressLines(label, unit))


def _reporting(items: list[T], report: ProgressLines) -> Iterator[T]:
    for done, item in enumerate(items):
        report(done, len(items))
        yield item
    report(len(items), len(items))


@contextmanager
def heartbeat(label: str, quiet: bool = False, every: float | None = None) -> Iterator[None]:
    """For work with no count (an export, a benchmark pipeline): ``label: still running, N s`` on
    standard error every ``every`` seconds (at least 1) while the block runs."""
    if quiet:
        yield
        return
    period = max(1.0, interval() if every is None else every)
    stop = threading.Event()
    start = time.monotonic()

    def beat() -> None:
        while not stop.wait(period):
            print(f"{label}: still running, {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)

    thread = threading.Thread(target=beat, name="knnclip-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
