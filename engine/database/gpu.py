"""A GPU copy of the database's index for search: through faiss-gpu, or, where faiss-gpu is not
installed but torch can reach a CUDA device, an exact search of a flat index as one matrix
product and a top-k on the device.

The CPU index stays the source of truth (it is what is checkpointed, and GPU indexes cannot
``remove_ids``). Appends are queued and reach the GPU in one ``add`` before the next search,
because every GPU add reallocates; a removal rebuilds the copy.

faiss-gpu's limits are checked before anything moves (:func:`faiss_gpu_problems`): IVF-PQ codes of
at most 96 bytes, in the sizes its kernels have (56, 64 and 96 with float16 lookup tables, which
``GpuClonerOptions.useFloat16`` turns on), 8 bits
per sub-quantiser, no HNSW; a search asking for more than 2048 neighbours or probes runs on the
CPU index instead, with a warning (:meth:`FaissGpuMirror.can_search`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import faiss
import numpy as np

from knnclip.engine.database.indexes import IndexSpec
from knnclip.engine.errors import BackendUnavailableError, OutOfMemoryError

log = logging.getLogger("knnclip.database")

# faiss/gpu/GpuIndexIVFPQ: the code sizes (bytes per vector) its kernels are compiled for, the
# ones that need float16 lookup tables to fit shared memory, and the most k / nprobe it selects.
GPU_PQ_CODE_BYTES = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
GPU_PQ_FLOAT16_TABLES = (56, 64, 96)
GPU_MAX_SELECTION = 2048


def faiss_gpu_problems(spec: IndexSpec) -> list[str]:
    """Why faiss-gpu cannot hold an index of ``spec`` (empty when it can)."""
    if spec.kind == "hnsw":
        return ["faiss-gpu has no HNSW index"]
    if spec.kind == "ivf-rabitq":
        return ["faiss-gpu has no RaBitQ index: search an ivf-rabitq database on the CPU (its re-rank store is there)"]
    problems = []
    if spec.kind == "ivf-pq":
        m, nbits = spec.params.get("m"), spec.params.get("nbits", 8)
        if nbits != 8:
            problems.append(f"faiss-gpu's IVF-PQ takes 8 bits per sub-quantiser, this index has {nbits}")
        if m is not None and m * nbits // 8 not in GPU_PQ_CODE_BYTES:
            problems.append(
                f"faiss-gpu's IVF-PQ takes codes of {', '.join(map(str, GPU_PQ_CODE_BYTES))} bytes, this index's are "
                f"{m * nbits // 8} (m={m}); create the database with index_params={{'m': 96}} (or another listed size)"
            )
    for name in ("nprobe",):
        value = spec.params.get(name)
        if value is not None and value > GPU_MAX_SELECTION:
            problems.append(f"{name}={value} is above faiss-gpu's limit of {GPU_MAX_SELECTION}")
    return problems


def open_gpu_mirror(spec: IndexSpec, dim: int, cpu_index: faiss.Index | None) -> Any:
    """The best GPU search this installation has for ``spec``: faiss-gpu, else torch (flat
    indexes), else BackendUnavailableError saying what to install or how to open."""
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() >= 1:
        return FaissGpuMirror(spec, dim, cpu_index)
    torch_cuda = _torch_cuda()
    if torch_cuda and spec.kind == "flat":
        log.info("faiss-gpu is not installed: exact search on the GPU through torch")
        return ArrayGpuMirror(spec, dim, cpu_index, device="cuda")
    reason = "a flat index (exact search through torch)" if torch_cuda else "torch with CUDA for flat indexes"
    raise BackendUnavailableError(
        "device='cuda' needs faiss with GPU support and a visible GPU (faiss-gpu-cu13-cuvs in place of faiss-cpu: "
        f"docs/backends.md), or {reason}; open the database with device='cpu' otherwise"
    )


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class FaissGpuMirror:
    device = "cuda"

    def __init__(self, spec: IndexSpec, dim: int, cpu_index: faiss.Index | None, device: int = 0) -> None:
        problems = faiss_gpu_problems(spec)
        if problems:
            raise _cannot_move(problems)
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
            if self._spec.kind == "ivf-pq":
                m, nbits = pq_shape(cpu_index)
                problems = faiss_gpu_problems(replace(self._spec, params={**self._spec.params, "m": m, "nbits": nbits}))
                if problems:  # m is known for sure only once train() resolved it
                    raise _cannot_move(problems)
                # These code sizes fit shared memory only with float16 lookup tables, which is what
                # useFloat16 means for IVF-PQ (faiss has no useFloat16LookupTables option: set on
                # the SWIG object it would be accepted silently and change nothing).
                options.useFloat16 = options.useFloat16 or m * nbits // 8 in GPU_PQ_FLOAT16_TABLES
            self._gpu = _faiss_call(
                "copy the index to the GPU", faiss.index_cpu_to_gpu, self._res, self._device, cpu_index, options
            )

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self._pending.append((vectors, ids))

    def can_search(self, k: int, params: Any) -> bool:
        """False (with a warning) when the search exceeds faiss-gpu's selection limit: the caller
        searches the CPU index instead."""
        nprobe = getattr(params, "nprobe", 0) if params is not None else 0
        if k <= GPU_MAX_SELECTION and nprobe <= GPU_MAX_SELECTION:
            return True
        log.warning(
            "k=%d, nprobe=%d exceed faiss-gpu's limit of %d: searching on the CPU", k, nprobe, GPU_MAX_SELECTION
        )
        return False

    def _prepare(self, params: Any) -> None:
        """The queued appends added (one GPU add), and the search's nprobe set."""
        if self._pending:
            vectors = np.concatenate([v for v, _ in self._pending])
            ids = np.concatenate([i for _, i in self._pending])
            if self._spec.positional:
                _faiss_call("add to the GPU index", self._gpu.add, vectors)
            else:
                _faiss_call("add to the GPU index", self._gpu.add_with_ids, vectors, ids)
            self._pending.clear()
        if params is not None and hasattr(params, "nprobe"):
            self._gpu.nprobe = params.nprobe  # GPU IVF indexes take nprobe as an attribute

    def search(self, queries: np.ndarray, k: int, params: Any) -> tuple[np.ndarray, np.ndarray]:
        self._prepare(params)
        return _faiss_call("search the GPU index", self._gpu.search, queries, k)

    def search_device(self, queries: Any, k: int, params: Any) -> tuple[Any, Any]:
        """:meth:`search` for a torch tensor of queries, which faiss-gpu reads in place on its
        device: (similarities, positions or ids) as tensors there.

        Through ``search_c`` and the tensors' addresses, as ``faiss.contrib.torch_utils`` does it
        without importing that module, which patches every faiss index in the process (its
        ``reconstruct_n`` then returns torch tensors to every caller). The queries' stream is
        finished first, and faiss' own before the results are handed over."""
        import torch

        self._prepare(params)
        queries = queries.contiguous()
        n = int(queries.shape[0])
        sims = torch.empty((n, k), dtype=torch.float32, device=queries.device)
        found = torch.empty((n, k), dtype=torch.int64, device=queries.device)
        if queries.is_cuda:
            torch.cuda.current_stream(queries.device).synchronize()
        _faiss_call(
            "search the GPU index",
            self._gpu.search_c,
            n,
            faiss.cast_integer_to_float_ptr(queries.data_ptr()),
            k,
            faiss.cast_integer_to_float_ptr(sims.data_ptr()),
            faiss.cast_integer_to_idx_t_ptr(found.data_ptr()),
        )
        self._res.syncDefaultStreamCurrentDevice()
        return sims, found


def _cannot_move(problems: list[str]) -> BackendUnavailableError:
    return BackendUnavailableError(
        f"this database's index cannot move to the GPU: {'; '.join(problems)}; open it with device='cpu'"
    )


def pq_shape(cpu_index: faiss.Index) -> tuple[int, int]:
    """(m, nbits) of a trained IVF-PQ index, as faiss resolved them."""
    ivf = faiss.extract_index_ivf(cpu_index)
    pq = faiss.downcast_index(ivf).pq
    return int(pq.M), int(pq.nbits)


def _faiss_call(action: str, call: Any, *args: Any) -> Any:
    """``call(*args)`` with faiss-gpu's C++ exceptions (RuntimeError through SWIG) as named errors."""
    try:
        return call(*args)
    except RuntimeError as exc:
        message = " ".join(str(exc).split())[:400]
        if "out of memory" in message.lower() or "cudaErrorMemoryAllocation" in message:
            raise OutOfMemoryError(f"faiss-gpu could not {action}: the GPU is out of memory ({message})") from None
        raise BackendUnavailableError(f"faiss-gpu could not {action}: {message}; open with device='cpu'") from None


class ArrayGpuMirror:
    """Exact inner-product search of a flat index with torch: the stored vectors on the device
    (fp16 where the index stores fp16 or sq8, as faiss-gpu does), scanned in chunks of rows, each
    widened to fp32 for its matrix product with the queries, with a running top-k. Similarities
    are fp32 throughout (an fp16 product rounds them and overflows past 65504 for inner products)
    and no [queries x entries] matrix is ever made (250 x 10^7 scores would be 10 GB).
    ``device="cpu"`` runs the same code on the CPU, for tests."""

    SCORE_BYTES = 256 << 20  # one chunk's [queries x rows] fp32 scores

    def __init__(self, spec: IndexSpec, dim: int, cpu_index: faiss.Index | None, *, device: str = "cuda") -> None:
        if spec.kind != "flat":
            raise BackendUnavailableError(f"exact GPU search without faiss-gpu is for flat indexes, not {spec.kind}")
        self._device, self._dim = device, dim
        self.device = device
        self._half = spec.storage != "fp32"
        self._pending: list[np.ndarray] = []
        self._vectors: Any = None
        self.rebuild(cpu_index)

    def rebuild(self, cpu_index: faiss.Index | None) -> None:
        self._pending.clear()
        stored = np.zeros((0, self._dim), np.float32)
        if cpu_index is not None and cpu_index.ntotal:
            stored = cpu_index.reconstruct_n(0, cpu_index.ntotal)
        self._vectors = self._to_device(stored)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self._pending.append(np.ascontiguousarray(vectors, np.float32))

    def can_search(self, k: int, params: Any) -> bool:
        return True

    def _to_device(self, a: np.ndarray) -> Any:
        import torch

        t = torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(self._device)
        return t.half() if self._half else t

    def search(self, queries: np.ndarray, k: int, params: Any) -> tuple[np.ndarray, np.ndarray]:
        import torch

        q = torch.from_numpy(np.ascontiguousarray(queries, np.float32)).to(self._device)
        sims, positions = self.search_device(q, k, params)
        return sims.cpu().numpy(), positions.cpu().numpy()

    def search_device(self, q: Any, k: int, params: Any) -> tuple[Any, Any]:
        """The search for a torch tensor of queries on this copy's device: (similarities [M, k],
        positions [M, k]) there, -inf and -1 past the stored entries."""
        import torch

        if self._pending:
            extra = self._to_device(np.concatenate(self._pending))
            self._pending.clear()
            self._vectors = torch.cat([self._vectors, extra])
        n, m = int(self._vectors.shape[0]), int(q.shape[0])
        sims = torch.full((m, k), float("-inf"), dtype=torch.float32, device=q.device)
        positions = torch.full((m, k), -1, dtype=torch.int64, device=q.device)
        top = min(k, n)
        if top == 0 or m == 0:
            return sims, positions
        q = q.float()
        rows = max(top, self.SCORE_BYTES // (4 * m))
        best_values = torch.empty((m, 0), dtype=torch.float32, device=q.device)
        best_index = torch.empty((m, 0), dtype=torch.int64, device=q.device)
        for start in range(0, n, rows):
            scores = q @ self._vectors[start : start + rows].float().T  # fp32 [queries, rows]
            values, index = torch.topk(scores, min(top, scores.shape[1]), dim=1)
            best_values = torch.cat([best_values, values], dim=1)
            best_index = torch.cat([best_index, index + start], dim=1)
            if best_values.shape[1] > top:  # keep the running top-k (ties keep the earlier row)
                best_values, order = torch.topk(best_values, top, dim=1)
                best_index = torch.gather(best_index, 1, order)
        sims[:, :top], positions[:, :top] = best_values, best_index
        return sims, positions
