"""The TensorRT engine cache's logic, without TensorRT: keys, stale and damaged entries, and two
processes building one engine at once."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import time
from pathlib import Path

import pytest

from knnclip.engine.backends.tensorrt.cache import EngineCache, EngineKey

KEY = EngineKey(
    onnx_sha256="ab" * 32, tensorrt_version="10.13.0", gpu_name="NVIDIA H100", compute_capability="9.0",
    precision="fp16", profiles=(("images", (1, 3, 518, 518), (4, 3, 518, 518), (4, 3, 518, 518)),),
)  # fmt: skip


class TestLookup:
    """Catches a cache that hands out an engine built for something else."""

    def test_round_trip(self, tmp_path):
        cache = EngineCache(tmp_path)
        assert cache.get(KEY) is None
        cache.put(KEY, b"plan-bytes")
        assert cache.get(KEY) == b"plan-bytes"

    @pytest.mark.parametrize(
        "change",
        [
            {"tensorrt_version": "11.0.0"},
            {"gpu_name": "NVIDIA A100", "compute_capability": "8.0"},
            {"onnx_sha256": "cd" * 32},
            {"precision": "fp32"},
        ],
    )
    def test_other_key_misses(self, tmp_path, change):
        cache = EngineCache(tmp_path)
        cache.put(KEY, b"plan")
        assert cache.get(dataclasses.replace(KEY, **change)) is None

    def test_stale_manifest_under_the_same_name_is_refused(self, tmp_path, caplog):
        """A manifest edited (or written by an older knnclip) to another TensorRT version."""
        cache = EngineCache(tmp_path)
        cache.put(KEY, b"plan")
        meta_path = tmp_path / f"{KEY.digest()}.json"
        meta = json.loads(meta_path.read_text())
        meta["key"]["tensorrt_version"] = "8.6.1"
        meta_path.write_text(json.dumps(meta))
        assert cache.get(KEY) is None
        assert "stale engine" in caplog.text and "8.6.1" in caplog.text

    def test_damaged_plan_is_refused_and_rebuilt(self, tmp_path, caplog):
        cache = EngineCache(tmp_path)
        cache.put(KEY, b"plan-bytes")
        (tmp_path / f"{KEY.digest()}.plan").write_bytes(b"plan-bytez")
        assert cache.get(KEY) is None and "damaged" in caplog.text
        assert cache.get_or_build(KEY, lambda: b"rebuilt") == b"rebuilt"
        assert cache.get(KEY) == b"rebuilt"

    def test_unreadable_manifest(self, tmp_path):
        cache = EngineCache(tmp_path)
        cache.put(KEY, b"plan")
        (tmp_path / f"{KEY.digest()}.json").write_text("{not json")
        assert cache.get(KEY) is None

    def test_empty_build_is_an_error(self, tmp_path):
        with pytest.raises(Exception, match="no engine"):
            EngineCache(tmp_path).get_or_build(KEY, lambda: b"")
        assert not list(tmp_path.glob("*.plan"))


def _builder(root: str, log: str, tag: str) -> None:
    def build() -> bytes:
        with open(log, "a") as f:
            f.write(f"{tag} builds\n")
        time.sleep(1.0)  # long enough for the other process to wait on the lock
        return f"plan from {tag}".encode()

    plan = EngineCache(root).get_or_build(KEY, build)
    with open(log, "a") as f:
        f.write(f"{tag} got {plan.decode()}\n")


def test_two_processes_build_once(tmp_path: Path):
    log = tmp_path / "log.txt"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_builder, args=(str(tmp_path / "cache"), str(log), tag)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = log.read_text().splitlines()
    builds = [line for line in lines if line.endswith("builds")]
    got = {line.split(" got ")[1] for line in lines if " got " in line}
    assert len(builds) == 1, lines
    assert got == {f"plan from {builds[0].split()[0]}"}, "both processes use the one engine built"


def test_profiles_cover_a_dynamic_image_graphs_input_range():
    """TensorRT's optimisation profile of an image graph with dynamic spatial axes spans its
    manifest's input_range (batch 1..max_batch); fixed axes stay as they are."""
    from knnclip.engine.backends.tensorrt.builder import BuildSettings, profiles_for

    manifest = {
        "inputs": [{"name": "images", "shape": ["batch", 3, "height", "width"], "dtype": "float32"}],
        "input_range": {"min": [32, 32], "opt": [800, 1088], "max": [1344, 1344], "divisibility": 32},
    }
    ((name, lo, opt, hi),) = profiles_for(manifest, BuildSettings(max_batch=4))
    assert name == "images" and lo == (1, 3, 32, 32) and opt == (4, 3, 800, 1088) and hi == (4, 3, 1344, 1344)
    fixed = {"inputs": [{"name": "images", "shape": ["batch", 3, 512, 704], "dtype": "float32"}]}
    assert profiles_for(fixed, BuildSettings(max_batch=2))[0][1:] == (
        (1, 3, 512, 704),
        (2, 3, 512, 704),
        (2, 3, 512, 704),
    )
