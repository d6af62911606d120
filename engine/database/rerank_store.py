"""The re-rank store of a compressed index: every entry's vector at ``sq8`` or ``fp16``, kept in
RAM or memory-mapped from disk, to re-score the candidates the compressed codes propose.

1-bit codes rank well enough to put the true neighbours among the top 100 candidates, not to
order them: re-scoring those candidates from 8- or 16-bit vectors gives exact search's decisions
(``benchmarks/results/vocabulary-scale-1000000.md``). Only the candidates' rows are read, so a store
memory-mapped from disk costs page-cache reads, not resident memory.

Rows are append-only, in the order entries were added, in *segments*: each checkpoint writes the
rows added since the last one as a new segment file and keeps the older ones, so a checkpoint
costs what changed, not the whole store. Removed entries leave their rows behind (``rows`` maps
each live entry to its row) until the next checkpoint compacts the store into one segment.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from knnclip.engine.errors import InvalidInputError

__all__ = ["STORE_PLACES", "STORE_PRECISIONS", "RerankStore"]

STORE_PRECISIONS = ("sq8", "fp16")
STORE_PLACES = ("ram", "disk")
_RANGE_MARGIN = 0.1  # sq8 ranges widen by this share on each side, as the sq8 flat index's do
_QUERY_BLOCK = 32  # queries re-scored together: bounds the gathered rows to 32 x depth x dim


class RerankStore:
    """Vectors by row at ``precision``; ``ranges`` (float32 [2, dim]: minimum and step per
    dimension) decode sq8 codes as ``minimum + code * step``."""

    def __init__(
        self,
        precision: str,
        dim: int,
        ranges: np.ndarray | None,
        segments: Sequence[np.ndarray] = (),
        rows: np.ndarray | None = None,
    ) -> None:
        if precision not in STORE_PRECISIONS:
            raise InvalidInputError(f"the re-rank store is {' or '.join(STORE_PRECISIONS)}, got {precision!r}")
        if precision == "sq8" and (ranges is None or ranges.shape != (2, dim)):
            raise ValueError(f"an sq8 store needs ranges of shape (2, {dim})")
        self.precision, self.dim = precision, dim
        self.ranges = None if ranges is None else np.asarray(ranges, np.float32)
        self.segments: list[np.ndarray] = list(segments)  # written (maybe memory-mapped) rows
        self._pending: list[np.ndarray] = []  # rows added since the last checkpoint, in RAM
        self.rows = rows  # live entry position -> row; None: every row, in order
        # The checkpoint's records of the files ``segments`` were read from (opaque here).
        self.segment_records: list[object] = []

    @classmethod
    def trained(cls, precision: str, samples: np.ndarray) -> RerankStore:
        """An empty store whose sq8 ranges cover ``samples`` (widened by 10% on each side)."""
        dim = samples.shape[1]
        if precision != "sq8":
            return cls(precision, dim, None)
        low, high = samples.min(axis=0), samples.max(axis=0)
        margin = (high - low) * _RANGE_MARGIN
        low, high = low - margin, high + margin
        step = np.maximum(high - low, 1e-12) / 255.0
        return cls(precision, dim, np.stack([low, step]).astype(np.float32))

    @property
    def dtype(self) -> type[np.generic]:
        return np.uint8 if self.precision == "sq8" else np.float16

    @property
    def written_rows(self) -> int:
        return sum(len(s) for s in self.segments)

    @property
    def total_rows(self) -> int:
        return self.written_rows + sum(len(p) for p in self._pending)

    def __len__(self) -> int:
        return self.total_rows if self.rows is None else len(self.rows)

    def encode(self, x: np.ndarray) -> np.ndarray:
        if self.precision == "fp16":
            return x.astype(np.float16)
        assert self.ranges is not None
        codes = np.rint((x - self.ranges[0]) / self.ranges[1])
        return np.clip(codes, 0, 255).astype(np.uint8)

    def add(self, x: np.ndarray) -> None:
        """Append the rows of entries added after every stored one (``x`` float32 [n, dim])."""
        start = self.total_rows
        self._pending.append(self.encode(x))
        if self.rows is not None:
            self.rows = np.concatenate([self.rows, np.arange(start, start + len(x), dtype=np.int64)])

    def keep(self, keep: np.ndarray) -> None:
        """Keep the live entries where ``keep`` is True (a mask over the live entries, in order)."""
        current = np.arange(self.total_rows, dtype=np.int64) if self.rows is None else self.rows
        self.rows = current[keep]

    # Reading ---------------------------------------------------------------------------------
    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """The stored codes of ``rows`` (any shape), shape ``rows.shape + (dim,)``."""
        flat = rows.reshape(-1)
        if len(self._pending) > 1:  # joined once per batch of adds, not once per search
            self._pending = [np.concatenate(self._pending)]
        parts = [*self.segments, *self._pending]
        if len(parts) == 1:
            return parts[0][flat].reshape(*rows.shape, self.dim)
        out = np.empty((len(flat), self.dim), self.dtype)
        starts = np.cumsum([0, *(len(p) for p in parts)])
        part_of = np.searchsorted(starts, flat, side="right") - 1
        for i in np.unique(part_of).tolist():
            at = np.flatnonzero(part_of == i)
            out[at] = parts[i][flat[at] - starts[i]]
        return out.reshape(*rows.shape, self.dim)

    def row_of(self, positions: np.ndarray) -> np.ndarray:
        return positions if self.rows is None else self.rows[positions]

    def vectors(self, positions: np.ndarray) -> np.ndarray:
        """The decoded vectors (float32) of the live entries at ``positions``."""
        codes = self._gather(self.row_of(np.asarray(positions, np.int64))).astype(np.float32)
        if self.precision == "sq8":
            assert self.ranges is not None
            codes *= self.ranges[1]
            codes += self.ranges[0]
        return codes

    def scores(self, queries: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Inner products of ``queries[Q, dim]`` with the stored vectors of ``positions[Q, R]``
        (live entry positions, -1 where there is none: -inf there)."""
        out = np.full(positions.shape, -np.inf, np.float32)
        if self.precision == "sq8":
            assert self.ranges is not None
            # q . (minimum + code * step) = q . minimum + (q * step) . code
            weights, offsets = queries * self.ranges[1], queries @ self.ranges[0]
        else:
            weights, offsets = queries, np.zeros(len(queries), np.float32)
        for lo in range(0, len(queries), _QUERY_BLOCK):
            pos = positions[lo : lo + _QUERY_BLOCK]
            real = pos >= 0
            codes = self._gather(self.row_of(np.where(real, pos, 0)))  # [b, R, dim], one pass over the store
            for i in range(len(pos)):
                # one matrix-vector product per query: BLAS's gemv, where a batched matmul over
                # [b, R, dim] x [b, dim, 1] takes numpy's slow path (3-4x slower, measured)
                s = codes[i].astype(np.float32) @ weights[lo + i] + offsets[lo + i]
                out[lo + i] = np.where(real[i], s, -np.inf)
        return out

    # Checkpoints -----------------------------------------------------------------------------
    @property
    def needs_compaction(self) -> bool:
        """True when removed entries left rows behind: the next checkpoint rewrites the store."""
        return self.rows is not None

    def pending_rows(self) -> np.ndarray:
        """The rows added since the last checkpoint (the next segment)."""
        if not self._pending:
            return np.zeros((0, self.dim), self.dtype)
        return np.concatenate(self._pending)

    def live_rows(self, block: int = 1 << 16) -> list[np.ndarray]:
        """Every live entry's row in entry order, in blocks (for a compacting checkpoint)."""
        rows = np.arange(self.total_rows, dtype=np.int64) if self.rows is None else self.rows
        return [self._gather(rows[i : i + block]) for i in range(0, len(rows), block)]

    def checkpointed(self, segments: Sequence[np.ndarray], records: Sequence[object]) -> None:
        """The store now is ``segments``, read from the files of ``records`` (as a checkpoint
        wrote them); nothing is pending."""
        self.segments, self.segment_records = list(segments), list(records)
        self._pending, self.rows = [], None

    def resident_bytes(self) -> int:
        """Bytes held in process memory (memory-mapped segments are not)."""
        held = sum(s.nbytes for s in self.segments if not isinstance(s, np.memmap))
        held += sum(p.nbytes for p in self._pending)
        held += 0 if self.rows is None else self.rows.nbytes
        return held + (0 if self.ranges is None else self.ranges.nbytes)

    def disk_segment_bytes(self) -> int:
        return sum(s.nbytes for s in self.segments)
