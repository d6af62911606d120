"""Exact search over the codes of a flat fp16 or sq8 index, with BLAS.

FAISS scans IndexScalarQuantizer codes one vector at a time; a block of codes decoded to float32
and multiplied with all queries at once runs about 10x faster on a CPU (numbers in
benchmarks/results/database.md). The codes are read in place from the FAISS index (no copy of
the database), decoded block by block, and the best k of each block are merged into a running
top-k. Scores equal FAISS's up to float32 rounding order.

sq8 decodes as ``vmin + (code + 0.5) / 255 * vdiff`` per dimension, so
``q . x = q . vmin + (q * vdiff / 255) . (code + 0.5)``: one product with the raw codes.
"""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np

from knnclip import _C

BLOCK_ROWS = 4096


def _codes(index: faiss.Index) -> np.ndarray:
    """The index's code array as a read-only NumPy view [ntotal, code_size] (no copy)."""
    n, size = index.ntotal, index.code_size
    if n == 0:
        return np.zeros((0, size), np.uint8)
    buf = faiss.rev_swig_ptr(index.codes.data(), n * size)
    view = np.asarray(buf).reshape(n, size)
    view.flags.writeable = False
    return view


def scan(index: faiss.Index, storage: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products of ``queries`` [M, d] against every vector of a flat SQ index.

    Returns (scores [M, k] float32, positions [M, k] int64), best first, -inf/-1 past the end.
    """
    codes = _codes(index)
    d = index.d
    block = np.empty((BLOCK_ROWS, d), np.float32)
    if storage == "fp16":
        halves = codes.view(np.float16)
        lhs, offset = queries, None

        def decode(start: int, stop: int) -> np.ndarray:
            _C.f16_to_f32(halves[start:stop], block[: stop - start])
            return block[: stop - start]

    elif storage == "sq8":
        trained = faiss.vector_to_array(index.sq.trained)
        vmin, vdiff = trained[:d], trained[d:]
        lhs = np.ascontiguousarray(queries * (vdiff / 255.0), dtype=np.float32)
        offset = (queries @ vmin + 0.5 * lhs.sum(axis=1)).astype(np.float32)[:, None]

        def decode(start: int, stop: int) -> np.ndarray:
            np.copyto(block[: stop - start], codes[start:stop], casting="unsafe")
            return block[: stop - start]

    else:
        raise ValueError(f"flat scan supports fp16 and sq8 storage, not {storage}")
    best, best_pos = _topk_blocks(lhs, decode, len(codes), k)
    if offset is not None:
        best += offset
    return best, best_pos


def _topk_blocks(
    lhs: np.ndarray, decode: Callable[[int, int], np.ndarray], n: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Running top-k over blocks; within a block FAISS's BLAS + heap kernel does the selection."""
    m = len(lhs)
    best = np.full((m, k), -np.inf, np.float32)
    best_pos = np.full((m, k), -1, np.int64)
    rows = np.arange(m)[:, None]
    for start in range(0, n, BLOCK_ROWS):
        stop = min(n, start + BLOCK_ROWS)
        scores, pos = faiss.knn(lhs, decode(start, stop), k, metric=faiss.METRIC_INNER_PRODUCT)
        found = pos >= 0
        cand = np.concatenate([best, np.where(found, scores, -np.inf)], axis=1)
        cand_pos = np.concatenate([best_pos, np.where(found, pos + start, -1)], axis=1)
        # Best first; equal scores keep the earlier position, as an exact scan in index order would.
        order = np.lexsort((np.where(cand_pos < 0, n + 1, cand_pos), -cand), axis=1)[:, :k]
        best, best_pos = cand[rows, order], cand_pos[rows, order]
    return best, best_pos
