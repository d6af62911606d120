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
from knnclip.engine.errors import InvalidInputError
from tests.support.damage import damage
from tests.support.manifests import stand_in_manifest

KEY = EngineKey(
    artifact_sha256="ab" * 32,
    tensorrt_version="10.13.0",
    gpu_name="NVIDIA H100",
    compute_capability="9.0",
    precision="fp16",
    profiles=(("images", (1, 3, 518, 518), (4, 3, 518, 518), (4, 3, 518, 518)),),
)


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
            {"artifact_sha256": "cd" * 32},
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

    manifest = stand_in_manifest(
        {
            "inputs": [{"name": "images", "shape": ["batch", 3, "height", "width"], "dtype": "float32"}],
            "input_range": {"min": [32, 32], "opt": [800, 1088], "max": [1344, 1344], "divisibility": 32},
        }
    )
    ((name, lo, opt, hi),) = profiles_for(manifest, BuildSettings(max_batch=4))
    assert name == "images" and lo == (1, 3, 32, 32) and opt == (4, 3, 800, 1088) and hi == (4, 3, 1344, 1344)
    text = stand_in_manifest({"inputs": [{"name": "tokens", "shape": ["texts", 77], "dtype": "int64"}]})
    # the text bank sends up to 256 prompts a call (14 templates a synonym): not 1..max_batch
    assert profiles_for(text, BuildSettings(max_batch=1)) == [("tokens", (1, 77), (256, 77), (256, 77))]
    unknown = stand_in_manifest({"inputs": [{"name": "x", "shape": ["frames", 3], "dtype": "float32"}]})
    with pytest.raises(InvalidInputError, match="'frames' with no known range"):
        profiles_for(unknown, BuildSettings())
    fixed = stand_in_manifest({"inputs": [{"name": "images", "shape": ["batch", 3, 512, 704], "dtype": "float32"}]})
    assert profiles_for(fixed, BuildSettings(max_batch=2))[0][1:] == (
        (1, 3, 512, 704),
        (2, 3, 512, 704),
        (2, 3, 512, 704),
    )


MANIFEST_BODY = {
    "precision": "fp32",
    "files": {
        "model": {"name": "model.onnx", "bytes": 1, "sha256": "11" * 32},
        "data": {"name": "model.onnx.data", "bytes": 1, "sha256": "22" * 32},
    },
    "inputs": [{"name": "images", "shape": ["batch", 3, 64, 64], "dtype": "float32"}],
}
MANIFEST = stand_in_manifest(MANIFEST_BODY)


def test_engine_key_covers_every_file_of_the_artifact(monkeypatch):
    """New external weights (model.onnx.data) with the same graph file mean another engine."""
    from knnclip.engine.backends.tensorrt import builder

    monkeypatch.setattr(builder, "gpu_identity", lambda: ("NVIDIA H200", "9.0"))
    settings = builder.BuildSettings()
    key = builder.engine_key(MANIFEST, settings, "10.13.0")
    data = {"name": "model.onnx.data", "bytes": 1, "sha256": "33" * 32}
    reweighted = stand_in_manifest({**MANIFEST_BODY, "files": {**MANIFEST_BODY["files"], "data": data}})
    assert builder.engine_key(reweighted, settings, "10.13.0").digest() != key.digest()
    assert builder.engine_key(stand_in_manifest(dict(MANIFEST_BODY)), settings, "10.13.0") == key
    assert key.precision == "fp32", "precision=None is the artefact's own"
    tf32 = builder.engine_key(MANIFEST, builder.BuildSettings(allow_tf32=True), "10.13.0")
    assert tf32.precision == "fp32+tf32" and tf32.digest() != key.digest()


def test_the_run_time_uses_what_knnclip_build_recorded(monkeypatch, tmp_path, caplog):
    from knnclip.engine.backends.tensorrt import builder

    monkeypatch.setattr(builder, "gpu_identity", lambda: ("NVIDIA H200", "9.0"))
    default = builder.settings_for(tmp_path, MANIFEST)
    assert (default.precision, default.max_batch, default.timing_cache_dir) == ("fp32", 1, tmp_path / "timing")
    built = builder.BuildSettings(precision="fp16", max_batch=8).for_artifact(MANIFEST)
    builder.record_build(tmp_path, MANIFEST, built)
    found = builder.settings_for(tmp_path, MANIFEST)
    assert (found.precision, found.max_batch) == ("fp16", 8)
    assert builder.engine_key(MANIFEST, found, "10.13.0") == builder.engine_key(MANIFEST, built, "10.13.0")
    (record,) = (tmp_path / "builds").iterdir()
    record.write_text("{ damaged")
    with caplog.at_level("WARNING", logger="knnclip.tensorrt"):
        assert builder.settings_for(tmp_path, MANIFEST).precision == "fp32"
    assert "unreadable build record" in caplog.text


class _FakeConfig:
    def __init__(self, log):
        self.log = log

    def set_memory_pool_limit(self, pool, size):
        self.log.append(("workspace", size))

    def clear_flag(self, flag):
        self.log.append(("clear", flag))

    def set_flag(self, flag):
        self.log.append(("set", flag))

    def add_optimization_profile(self, profile):
        pass

    def create_timing_cache(self, data):
        self.log.append(("timing-in", data))
        return object()

    def set_timing_cache(self, cache, ignore_mismatch):
        return self.log.count("refuse-timing") == 0

    def get_timing_cache(self):
        import types

        return types.SimpleNamespace(serialize=lambda: b"timing v2")


def _fake_tensorrt(monkeypatch, log, version="10.13.0"):
    import sys
    import types

    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", BF16="BF16", TF32="TF32")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    profile = types.SimpleNamespace(set_shape=lambda *a: log.append(("profile", a[0])))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return object()

        def create_builder_config(self):
            return _FakeConfig(log)

        def create_optimization_profile(self):
            return profile

        def build_serialized_network(self, network, config):
            return b"plan"

    trt.Builder = Builder
    trt.OnnxParser = lambda network, logger: types.SimpleNamespace(parse_from_file=lambda path: True, num_errors=0)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)


def test_build_engine_keeps_fp32_exact_and_its_timing_cache(monkeypatch, tmp_path):
    """An fp32 build turns TensorRT's default TF32 off (unless asked), reads and rewrites the
    timing cache beside the engines, and a refused timing cache is an error, not ignored."""
    from knnclip.engine.backends.tensorrt import builder

    log: list = []
    _fake_tensorrt(monkeypatch, log)
    monkeypatch.setattr(builder, "read_manifest", lambda directory: MANIFEST)
    timing = tmp_path / "engines" / "timing.cache"
    assert builder.build_engine(tmp_path, builder.BuildSettings(timing_cache=timing)) == b"plan"
    assert ("clear", "TF32") in log and not any(op == "set" for op, _ in log)
    assert timing.read_bytes() == b"timing v2"
    log.clear()
    builder.build_engine(tmp_path, builder.BuildSettings(allow_tf32=True, timing_cache=timing))
    assert ("clear", "TF32") not in log and ("timing-in", b"timing v2") in log
    log.clear()
    builder.build_engine(tmp_path, builder.BuildSettings(precision="fp16"))
    assert ("set", "FP16") in log and ("clear", "TF32") not in log
    log[:] = ["refuse-timing"]
    with pytest.raises(builder.EngineBuildError, match="timing cache"):
        builder.build_engine(tmp_path, builder.BuildSettings(timing_cache=timing))


def test_the_default_timing_cache_is_one_per_gpu_capability_and_tensorrt_version(monkeypatch, tmp_path):
    """TensorRT refuses a timing cache of another GPU or version (ignore_mismatch=False): one
    shared file would fail every build after a driver, GPU or TensorRT change."""
    from knnclip.engine.backends.tensorrt import builder

    monkeypatch.setattr(builder, "read_manifest", lambda directory: MANIFEST)
    written = set()
    for gpu, version in (
        (("NVIDIA H200", "9.0"), "10.13.0"),
        (("NVIDIA H200", "9.0"), "11.4.0"),
        (("Tesla T4", "7.5"), "10.13.0"),
    ):
        monkeypatch.setattr(builder, "gpu_identity", lambda gpu=gpu: gpu)
        _fake_tensorrt(monkeypatch, [], version=version)
        builder.build_engine(tmp_path, builder.settings_for(tmp_path / "engines", MANIFEST))
        written = {p.name for p in (tmp_path / "engines" / "timing").iterdir()}
    assert written == {
        "nvidia-h200-sm9.0-trt10.13.0.cache",
        "nvidia-h200-sm9.0-trt11.4.0.cache",
        "tesla-t4-sm7.5-trt10.13.0.cache",
    }


def test_tensorrt_11_builds_the_artifacts_precision_by_default(monkeypatch, tmp_path):
    from knnclip.engine.backends.tensorrt import builder

    log: list = []
    _fake_tensorrt(monkeypatch, log, version="11.0.0")
    monkeypatch.setattr(builder, "read_manifest", lambda directory: MANIFEST)
    assert builder.build_engine(tmp_path, builder.BuildSettings()) == b"plan"  # fp32 artefact, fp32 engine
    with pytest.raises(builder.EngineBuildError, match="export an fp16 ONNX graph"):
        builder.build_engine(tmp_path, builder.BuildSettings(precision="fp16"))


def test_the_engine_cache_lives_in_knnclips_cache_unless_named(monkeypatch, tmp_path):
    from knnclip.engine.cache import engine_cache_root

    monkeypatch.delenv("KNNCLIP_ENGINE_CACHE", raising=False)
    monkeypatch.delenv("KNNCLIP_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert engine_cache_root() == tmp_path / "home" / ".cache" / "knnclip" / "engines"
    monkeypatch.setenv("KNNCLIP_CACHE", str(tmp_path / "cache"))
    assert engine_cache_root() == tmp_path / "cache" / "engines"
    monkeypatch.setenv("KNNCLIP_ENGINE_CACHE", str(tmp_path / "engines"))
    assert engine_cache_root() == tmp_path / "engines"


@pytest.mark.parametrize(
    "damage",
    [
        lambda meta: {**meta, "key": ["not", "a", "dict"]},  # was an AttributeError
        lambda meta: {**meta, "plan_bytes": 10**30},
        lambda meta: {**meta, "plan_bytes": "many"},
        lambda meta: [meta],
    ],
)
def test_damaged_engine_cache_entry_is_rebuilt(tmp_path: Path, damage) -> None:
    import json

    from knnclip.engine.backends.tensorrt.cache import EngineCache

    cache = EngineCache(tmp_path)
    cache.put(KEY, b"plan")
    (meta_path,) = tmp_path.glob("*.json")
    meta_path.write_text(json.dumps(damage(json.loads(meta_path.read_text()))))
    assert cache.get(KEY) is None
    assert cache.get_or_build(KEY, lambda: b"rebuilt") == b"rebuilt"
    assert cache.get(KEY) == b"rebuilt"


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_engine_cache_entry_replaced_by_a_directory_or_fifo_is_rebuilt(tmp_path: Path, kind: str) -> None:
    from knnclip.engine.backends.tensorrt.cache import EngineCache

    cache = EngineCache(tmp_path)
    cache.put(KEY, b"plan")
    for path in tmp_path.glob("*.plan"):
        damage(kind, path)
    assert cache.get(KEY) is None  # a FIFO is never opened for reading (it would block)
    assert cache.get_or_build(KEY, lambda: b"rebuilt") == b"rebuilt"
