"""A GPU copy of the database's index for search, through faiss-gpu.

The CPU index stays the source of truth (it is what is checkpointed, and GPU indexes cannot
``remove_ids``). Appends are queued and reach the GPU in one ``add`` before the next search,
because every GPU add reallocates; a removal rebuilds the copy.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from knnclip.engine.database.indexes import IndexSpec
from knnclip.engine.errors import BackendUnavailableError


class GpuMirror:
    def __init__(self, spec: IndexSpec, dim: int, cpu_index: faiss.Index | None, device: int = 0) -> None:
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
            raise BackendUnavailableError(
                "device='cuda' needs faiss with GPU support and a visible GPU "
                "(faiss-gpu-cu12 in place of faiss-cpu: docs/backends.md); "
                "open the database with device='cpu' otherwise"
            )
        if spec.kind == "hnsw":
            raise BackendUnavailableError("faiss-gpu has no HNSW index; open hnsw databases with device='cpu'")
        self._spec, self._dim, self._device = spec, dim, device
        self._res = faiss.StandardGpuResources()
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._gpu: Any = None
        self.rebuild(cpu_index)

    def rebuild(self, cpu_index: faiss.Index | None) -> None:
        self._pending.clear()
        if cpu_index is None or not cpu_index.is_trained:
            self._gpu = None
            return
        if self._spec.kind == "flat":
            # faiss-gpu has no flat scalar-quantiser index: fp16 and sq8 search as fp16 on the GPU.
            config = faiss.GpuIndexFlatConfig()
            config.device = self._device
            config.useFloat16 = self._spec.storage != "fp32"
            self._gpu = faiss.GpuIndexFlatIP(self._res, self._dim, config)
            if cpu_index.ntotal:
                self._gpu.add(cpu_index.reconstruct_n(0, cpu_index.ntotal))
        else:
            options = faiss.GpuClonerOptions()
            options.useFloat16 = self._spec.storage == "fp16"
            self._gpu = faiss.index_cpu_to_gpu(self._res, self._device, cpu_index, options)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self._pending.append((vectors, ids))

    def search(self, queries: np.ndarray, k: int, params: Any) -> tuple[np.ndarray, np.ndarray]:
        if self._pending:
            vectors = np.concatenate([v for v, _ in self._pending])
            ids = np.concatenate([i for _, i in self._pending])
            if self._spec.positional:
                self._gpu.add(vectors)
            else:
                self._gpu.add_with_ids(vectors, ids)
            self._pending.clear()
        if params is not None and hasattr(params, "nprobe"):
            self._gpu.nprobe = params.nprobe  # GPU IVF indexes take nprobe as an attribute
        return self._gpu.search(queries, k)
