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
