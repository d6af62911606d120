"""Per-stage wall-clock timing of one segmentation (milliseconds, accumulated per stage name)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Timer:
    """Accumulates the milliseconds spent in named stages.

    Examples
    --------
    >>> timer = Timer()
    >>> with timer.stage("decode"):
    ...     pass
    >>> list(timer.ms), timer.ms["decode"] >= 0.0
    (['decode'], True)
    """

    def __init__(self, synchronize: Callable[[], None] | None = None) -> None:
        self.ms: dict[str, float] = {}
        # On a device, work is queued: a stage ends when its work is done (``ArrayModule.synchronize``).
        self.synchronize = synchronize

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize is not None:
                self.synchronize()
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1e3

    def total(self) -> float:
        return sum(self.ms.values())
