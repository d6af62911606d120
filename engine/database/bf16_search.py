"""Exact search of a flat index in bfloat16 on the CPU, through OpenVINO: one compiled graph of a
matrix product with the stored vectors and a fused top-k, run with bf16 arithmetic (AVX-512 BF16
or AMX). Scores carry bf16's 8-bit mantissa, so near-ties can swap; the nearest neighbour and its
class agree with the fp32 search nearly always (``tests/test_database_bf16.py`` measures top-1
agreement and recall@k on clustered data; ``knnclip bench`` the end-to-end effect).

A search mirror like the GPU ones (``database/gpu.py``): the faiss index stays the source of
truth (checkpointed, durable); appends are queued and the graph is compiled again before the next
search, a removal rebuilds it. Compiling takes longer the more entries there are, so this suits
databases read far more often than they change.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import faiss
import numpy as np

from knnclip.engine.database.indexes import IndexSpec
from knnclip.engine.errors import BackendUnavailableError, needs_extra

log = logging.getLogger("knnclip.database")


class Bf16SearchMirror:
    device = "cpu"

    def __init__(self, spec: IndexSpec, dim: int, cpu_index: faiss.Index | None) -> None:
        if spec.kind != "flat":
            raise BackendUnavailableError(f"bf16 search is for flat (exact) indexes, not {spec.kind}")
        try:
            import openvino as ov
        except ImportError:
            raise needs_extra("bf16 search", "openvino") from None
        self._ov = ov
        self._core = ov.Core()
        if "BF16" not in self._core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise BackendUnavailableError("this CPU has no bfloat16 arithmetic (AVX-512 BF16 or AMX); search in fp32")
        self._dim = dim
        self._vectors = np.zeros((0, dim), np.float32)
        self._pending: list[np.ndarray] = []
        self._compiled: Any = None
        self._request: Any = None  # one infer request per compiled graph: searches hold the database's lock
        self.rebuild(cpu_index)

    def rebuild(self, cpu_index: faiss.Index | None) -> None:
        self._pending.clear()
        n = cpu_index.ntotal if cpu_index is not None and cpu_index.is_trained else 0
        self._vectors = (
            cpu_index.reconstruct_n(0, n) if n and cpu_index is not None else np.zeros((0, self._dim), np.float32)
        )
        self._compiled = None

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self._pending.append(np.ascontiguousarray(vectors, np.float32))
        self._compiled = None

    def can_search(self, k: int, params: Any) -> bool:
        return True

    def _compile(self) -> Any:
        if self._pending:
            self._vectors = np.concatenate([self._vectors, *self._pending])
            self._pending.clear()
        from openvino import opset13 as ops

        start = time.perf_counter()
        queries = ops.parameter([-1, self._dim], self._ov.Type.f32, name="queries")
        k = ops.parameter([], self._ov.Type.i64, name="k")
        scores = ops.matmul(queries, ops.constant(self._vectors), transpose_a=False, transpose_b=True)
        top = ops.topk(scores, k, axis=1, mode="max", sort="value", index_element_type="i64")
        model = self._ov.Model([top.output(0), top.output(1)], [queries, k], "knnclip-bf16-search")
        compiled = self._core.compile_model(
            model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY"}
        )
        log.info("bf16 search over %d entries compiled in %.1f s", len(self._vectors), time.perf_counter() - start)
        return compiled

    def search(self, queries: np.ndarray, k: int, params: Any) -> tuple[np.ndarray, np.ndarray]:
        if self._compiled is None and (len(self._vectors) or self._pending):
            self._compiled = self._compile()
            self._request = self._compiled.create_infer_request()
        n = len(self._vectors)
        sims = np.full((len(queries), k), -np.inf, np.float32)
        positions = np.full((len(queries), k), -1, np.int64)
        top = min(k, n)
        if top == 0 or len(queries) == 0:
            return sims, positions
        result = self._request.infer(
            {"queries": np.ascontiguousarray(queries, np.float32), "k": np.array(top, np.int64)}
        )
        # Copied out: the request reuses its output tensors on the next search.
        sims[:, :top], positions[:, :top] = result[self._compiled.output(0)], result[self._compiled.output(1)]
        return sims, positions
