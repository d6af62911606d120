"""The database's GPU search, on the CPU: faiss-gpu's limits checked before anything moves, and
the exact search through torch that a GPU machine without faiss-gpu uses, run here on torch's CPU
device against faiss' own exact search."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from knnclip.engine.database.gpu import ArrayGpuMirror, faiss_gpu_problems
from knnclip.engine.database.indexes import IndexSpec

DIM = 1536


def test_the_default_ivf_pq_is_refused_by_name_and_m96_is_accepted():
    default = IndexSpec.make("ivf-pq", None, None, DIM).resolved_for(10_000, DIM)
    assert default.params["m"] == 192
    (problem,) = faiss_gpu_problems(default)
    assert "192" in problem and "'m': 96" in problem
    assert faiss_gpu_problems(IndexSpec.make("ivf-pq", None, {"m": 96}, DIM).resolved_for(10_000, DIM)) == []
    assert "8 bits" in faiss_gpu_problems(IndexSpec.make("ivf-pq", None, {"m": 96, "nbits": 4}, DIM))[0]
    assert faiss_gpu_problems(IndexSpec.make("hnsw", None, None, DIM)) == ["faiss-gpu has no HNSW index"]
    assert "2048" in faiss_gpu_problems(IndexSpec.make("ivf-flat", None, {"nlist": 4096, "nprobe": 4096}, DIM))[0]
    assert faiss_gpu_problems(IndexSpec.make("flat", "fp16", None, DIM)) == []


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((16, dim))
    x = centres[rng.integers(0, 16, n)] + 0.3 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("storage", ["fp32", "fp16"])
def test_exact_search_through_torch_matches_faiss(storage):
    pytest.importorskip("torch")
    dim = 64
    base, extra, queries = clustered(300, dim, 1), clustered(50, dim, 2), clustered(40, dim, 3)
    index = faiss.IndexFlatIP(dim)
    index.add(base)
    mirror = ArrayGpuMirror(IndexSpec.make("flat", storage, None, dim), dim, index, device="cpu")
    mirror.add(extra, np.arange(300, 350))  # queued, then searched with the rest
    reference = faiss.IndexFlatIP(dim)
    reference.add(np.concatenate([base, extra]))
    want_sims, want_ids = reference.search(queries, 10)
    sims, ids = mirror.search(queries, 10, None)
    if storage == "fp32":
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(sims, want_sims, atol=1e-5)
    else:  # fp16 vectors: the same nearest neighbour, similarities to fp16 precision
        assert (ids[:, 0] == want_ids[:, 0]).mean() >= 0.95
        np.testing.assert_allclose(sims, want_sims, atol=2e-3)


def test_the_scan_in_chunks_with_a_running_top_k_equals_float64(monkeypatch):
    """Chunks of 7 rows (k = 10 spans several), and fp16-stored inner products past fp16's range:
    the similarities are fp32, so they neither overflow nor round to fp16's 11 bits."""
    pytest.importorskip("torch")
    dim, rng = 64, np.random.default_rng(6)
    stored = (rng.integers(-8, 9, (53, dim)) * 16).astype(np.float32)  # exact in fp16, products up to 1e6
    queries = (rng.integers(-8, 9, (5, dim)) * 16).astype(np.float32)
    index = faiss.IndexFlatIP(dim)
    index.add(stored)
    mirror = ArrayGpuMirror(IndexSpec.make("flat", "fp16", None, dim), dim, index, device="cpu")
    monkeypatch.setattr(ArrayGpuMirror, "SCORE_BYTES", 4 * len(queries) * 7)
    sims, ids = mirror.search(queries, 10, None)
    want = queries.astype(np.float64) @ stored.astype(np.float64).T
    assert np.abs(want).max() > 65504  # fp16 products would have overflowed
    np.testing.assert_array_equal(sims, np.sort(want, axis=1)[:, ::-1][:, :10].astype(np.float32))
    np.testing.assert_array_equal(np.take_along_axis(want, ids, 1).astype(np.float32), sims)


def test_exact_search_pads_past_the_stored_entries():
    pytest.importorskip("torch")
    index = faiss.IndexFlatIP(8)
    index.add(clustered(3, 8, 4))
    mirror = ArrayGpuMirror(IndexSpec.make("flat", "fp32", None, 8), 8, index, device="cpu")
    sims, ids = mirror.search(clustered(2, 8, 5), 5, None)
    assert (ids[:, 3:] == -1).all() and np.isneginf(sims[:, 3:]).all() and (ids[:, :3] >= 0).all()
    empty = ArrayGpuMirror(IndexSpec.make("flat", "fp32", None, 8), 8, None, device="cpu")
    assert (empty.search(clustered(2, 8, 5), 3, None)[1] == -1).all()


def test_a_cuda_database_without_any_gpu_search_says_what_to_do(tmp_path):
    from knnclip.engine import Database
    from knnclip.engine.errors import BackendUnavailableError

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("faiss-gpu with a GPU is installed here")
    Database.create(tmp_path / "db", 8, index="hnsw")
    with pytest.raises(BackendUnavailableError, match="device='cpu'"):
        Database.open(tmp_path / "db", device="cuda")


class _StrictClonerOptions:
    """faiss.GpuClonerOptions' fields: setting any other name fails here (SWIG would accept it silently)."""

    __slots__ = ("useFloat16", "indicesOptions", "useFloat16CoarseQuantizer", "usePrecomputed")

    def __init__(self) -> None:
        self.useFloat16 = False


class _StandInResources:
    """faiss.StandardGpuResources: its stream is the host's, so waiting for it waits for nothing."""

    synced = 0

    def syncDefaultStreamCurrentDevice(self) -> None:  # faiss' name
        _StandInResources.synced += 1


class _StandInFaissGpu:
    """faiss with a stand-in GPU: the CPU functions are faiss' own, the GPU ones record their calls."""

    def __init__(self, fail_search: str | None = None) -> None:
        self.copied_with = None
        self.fail_search = fail_search
        self.GpuClonerOptions = _StrictClonerOptions
        self.StandardGpuResources = _StandInResources
        self.extract_index_ivf = faiss.extract_index_ivf
        self.downcast_index = faiss.downcast_index
        self.cast_integer_to_float_ptr = faiss.cast_integer_to_float_ptr
        self.cast_integer_to_idx_t_ptr = faiss.cast_integer_to_idx_t_ptr

    def index_cpu_to_gpu(self, resources, device, index, options):
        import types

        self.copied_with = options

        def search(queries, k):
            if self.fail_search:
                raise RuntimeError(self.fail_search)
            return index.search(queries, k)

        return types.SimpleNamespace(
            search=search, search_c=index.search_c, add=index.add, add_with_ids=index.add_with_ids
        )


_KEEP_ALIVE: list = []  # SWIG does not keep an IVF index's quantizer alive by itself


def _trained_ivf_pq(dim: int, m: int) -> faiss.Index:
    """An IVF-PQ index as training leaves it: its pq holds m and nbits (marked trained rather than
    trained: the GPU is a stand-in, and real PQ training costs seconds for nothing checked here)."""
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, 4, m, 8, faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True
    _KEEP_ALIVE.append(quantizer)
    return index


@pytest.mark.parametrize(("m", "float16"), [(56, True), (28, False)])
def test_ivf_pq_codes_that_need_float16_lookup_tables_get_them(monkeypatch, m, float16):
    from knnclip.engine.database import gpu

    stand_in = _StandInFaissGpu()
    monkeypatch.setattr(gpu, "faiss", stand_in)
    spec = IndexSpec.make("ivf-pq", None, {"m": m, "nlist": 4}, 112)
    gpu.FaissGpuMirror(spec, 112, _trained_ivf_pq(112, m))
    assert stand_in.copied_with.useFloat16 is float16


def test_ivf_pq_limits_are_checked_again_with_the_m_training_resolved(monkeypatch):
    from knnclip.engine.database import gpu
    from knnclip.engine.errors import BackendUnavailableError

    monkeypatch.setattr(gpu, "faiss", _StandInFaissGpu())
    spec = IndexSpec.make("ivf-pq", None, {"nlist": 4}, 224)  # m left to training: it chose 112
    with pytest.raises(BackendUnavailableError, match="112"):
        gpu.FaissGpuMirror(spec, 224, _trained_ivf_pq(224, 112))


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (
            "Error in virtual void* faiss::gpu::StandardGpuResourcesImpl::allocMemory: "
            "cudaMalloc error 2 out of memory",
            "OutOfMemoryError",
        ),
        ("Error in GpuIndexIVFPQ: k > 2048", "BackendUnavailableError"),
    ],
)
def test_faiss_gpu_runtime_errors_become_named_errors(monkeypatch, message, error):
    from knnclip.engine.database import gpu

    monkeypatch.setattr(gpu, "faiss", _StandInFaissGpu(fail_search=message))
    spec = IndexSpec.make("ivf-pq", None, {"m": 28, "nlist": 4}, 112)
    mirror = gpu.FaissGpuMirror(spec, 112, _trained_ivf_pq(112, 28))
    with pytest.raises(Exception) as info:
        mirror.search(clustered(2, 112, seed=4), 5, None)
    assert type(info.value).__name__ == error and "faiss-gpu could not search" in str(info.value)


def test_queries_on_the_device_are_searched_there_and_agree_with_search(monkeypatch, tmp_path):
    """Database.search_device: queries that live on the device (torch) go to faiss-gpu as they are
    and the neighbours' class ids come back as tensors there (ids mapped on the device), equal to
    search()'s; a zero cosine query has none; a search past faiss-gpu's limit, or a database not
    opened on the GPU, is refused by name. The GPU is a stand-in whose index is faiss' own."""
    torch = pytest.importorskip("torch")
    from knnclip.engine import Database
    from knnclip.engine.database import gpu
    from knnclip.engine.errors import BackendUnavailableError

    stand_in = _StandInFaissGpu()
    stand_in.get_num_gpus = lambda: 1
    monkeypatch.setattr(gpu, "faiss", stand_in)
    vectors = clustered(400, 32, 5)
    with Database.create(tmp_path / "db", 32, index="ivf-flat", index_params={"nlist": 4, "nprobe": 4}) as db:
        db.train(vectors)
        db.add(vectors, [f"c{i % 5}" for i in range(400)])
    queries = clustered(6, 32, 9)
    queries[2] = 0.0
    with Database.open(tmp_path / "db", device="cuda", read_only=True) as db:
        assert db.device_search is not None
        want_sims, want_labels, _ = db.search(queries, 5)
        sims, labels = db.search_device(torch.from_numpy(queries), 5)
        assert isinstance(labels, torch.Tensor) and labels.dtype == torch.int64
        np.testing.assert_array_equal(labels.numpy(), want_labels)
        np.testing.assert_allclose(sims.numpy(), want_sims, rtol=1e-6)
        assert (labels[2] == -1).all() and torch.isneginf(sims[2]).all()
        assert _StandInResources.synced >= 1, "faiss' stream is waited for before the results are handed over"
        with pytest.raises(BackendUnavailableError, match="2048"):
            db.search_device(torch.from_numpy(queries), 4096)
    probe = faiss.IndexFlatIP(2)  # faiss' own classes are not patched for torch in this process
    probe.add(np.eye(2, dtype=np.float32))
    assert isinstance(probe.reconstruct_n(0, 2), np.ndarray)
    with Database.open(tmp_path / "db", read_only=True) as db:
        assert db.device_search is None
        with pytest.raises(BackendUnavailableError, match="device='cuda'"):
            db.search_device(torch.from_numpy(queries), 5)
