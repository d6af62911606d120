"""``backend="auto"`` on the CPU: the faster of ONNX Runtime and OpenVINO, measured once per
artefact and machine, recorded in the engine cache, and robust to damaged records and runtimes
that fail."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from knnclip.engine import backends
from knnclip.engine.artifact import FCCLIPImageManifest
from knnclip.engine.backends import choice
from knnclip.engine.backends.base import TensorSpec
from tests.support.manifests import stand_in_manifest

needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None,
    reason="the choice needs openvino installed beside onnxruntime (pip install 'knnclip[openvino]')",
)


DAMAGED = [
    b"",
    b"{not json",
    b"[1, 2]",
    b'{"format": "knnclip-backend-choice/1"}',
    b'{"format": "knnclip-backend-choice/1", "key": 1, "backend": "torch"}',
]


def test_the_incumbent_stays_unless_a_challenger_is_clearly_faster():
    assert choice.pick({"onnxruntime": 100.0, "openvino": 91.0}) == "onnxruntime"
    assert choice.pick({"onnxruntime": 100.0, "openvino": 90.0}) == "openvino"
    assert choice.pick({"onnxruntime": 100.0, "openvino": 120.0}) == "onnxruntime"
    assert choice.pick({"openvino": 5.0}) == "openvino"  # the only one that ran
    assert choice.pick({"a": 10.0, "b": 8.0, "c": 5.0}, ["a", "b", "c"]) == "c"
    with pytest.raises(ValueError):
        choice.pick({})


def test_sample_feeds_follow_the_manifest():
    image = TensorSpec("images", np.dtype("float32"), ("batch", 3, "height", "width"))
    tokens = TensorSpec("tokens", np.dtype("int64"), ("texts", 77))
    fixed = TensorSpec("images", np.dtype("float32"), ("batch", 3, 56, 56))

    feed = choice.sample_feed([image, tokens], stand_in_manifest({"input_size": [192, 256]}))
    assert feed["images"].shape == (1, 3, 192, 256) and feed["images"].dtype == np.float32
    assert 0.0 <= feed["images"].min() and feed["images"].max() < 1.0
    assert feed["tokens"].shape == (1, 77) and feed["tokens"].dtype == np.int64 and not feed["tokens"].any()
    fcclip = FCCLIPImageManifest("fcclip-image", {}, (), (), "fp32", None, None, {}, {}, min_size=96)
    dynamic = choice.sample_feed([image], fcclip)
    assert dynamic["images"].shape == (1, 3, 96, 96)
    assert choice.sample_feed([fixed], stand_in_manifest({}))["images"].shape == (1, 3, 56, 56)


@pytest.fixture
def artefact(tmp_path: Path) -> Path:
    pytest.importorskip("torch", reason="the artefact is exported from torch")
    from knnclip.engine.demo.models import seeded_dinov2
    from knnclip.export.dinov2.onnx import export_dinov2_onnx

    export_dinov2_onnx(seeded_dinov2(), tmp_path / "dinov2", size=56)
    return tmp_path / "dinov2"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KNNCLIP_ENGINE_CACHE", str(tmp_path / "engines"))
    monkeypatch.delenv("KNNCLIP_AUTO_MEASURE", raising=False)
    return tmp_path / "engines"


def records(cache: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((cache / "backend-choice").glob("*.json"))]


class Opens:
    """Counts the backends open_session opens, passing each call through to the real one."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[str] = []
        real = backends._open  # noqa: SLF001 - the one function every backend is opened through

        def counted(name, *args, **kwargs):
            self.names.append(name)
            return real(name, *args, **kwargs)

        monkeypatch.setattr(backends, "_open", counted)


@needs_openvino
def test_auto_measures_once_then_opens_the_recorded_winner(artefact, cache, monkeypatch):
    opens = Opens(monkeypatch)
    with backends.open_session(artefact, "auto", "cpu") as first:
        (record,) = records(cache)
        assert record["format"] == choice.FORMAT and set(record["ms"]) == {"onnxruntime", "openvino"}
        assert all(ms > 0 for ms in record["ms"].values()) and record["failed"] == {}
        assert first.backend == record["backend"] == choice.pick(record["ms"])
        assert "measured here now" in first.selection and record["backend"] in first.selection
        assert sorted(opens.names) == ["onnxruntime", "openvino"]
        want = first.infer(choice.sample_feed(first.inputs, first.manifest, seed=1))
    opens.names.clear()
    with backends.open_session(artefact, "auto", "cpu") as again:
        assert opens.names == [record["backend"]] and "measured here before" in again.selection  # no new timing
        got = again.infer(choice.sample_feed(again.inputs, again.manifest, seed=1))
    np.testing.assert_array_equal(got["keys"], want["keys"])
    # Other thread settings are another machine as far as the timings go: measured afresh.
    monkeypatch.setenv("KNNCLIP_OV_THREADS", "1")
    backends.open_session(artefact, "auto", "cpu").close()
    assert len(records(cache)) == 2


@needs_openvino
def test_the_record_decides(artefact, cache, monkeypatch):
    from knnclip.engine.artifact import read_manifest

    manifest = read_manifest(artefact)
    key = choice.machine_key(manifest, choice.CANDIDATES)
    path = choice.record_path(cache, key)
    for winner, ms in (
        ("openvino", {"onnxruntime": 50.0, "openvino": 10.0}),
        ("onnxruntime", {"onnxruntime": 10.0, "openvino": 50.0}),
    ):
        choice.write_choice(choice.Choice(winner, ms, path), key)
        with backends.open_session(artefact, "auto", "cpu") as session:
            assert session.backend == winner and "10.0 ms" in session.selection
    # A record made for other versions or another artefact is not this one's.
    stale = json.loads(path.read_text())
    stale["key"]["versions"]["openvino"] = "0.0"
    stale["backend"] = "openvino"
    path.write_text(json.dumps(stale))
    assert choice.read_choice(path, key, choice.CANDIDATES) is None


@needs_openvino
@pytest.mark.parametrize("damage", DAMAGED)
def test_a_damaged_record_is_measured_again(artefact, cache, damage, caplog):
    backends.open_session(artefact, "auto", "cpu").close()
    (path,) = (cache / "backend-choice").glob("*.json")
    path.write_bytes(damage)
    with caplog.at_level(logging.WARNING), backends.open_session(artefact, "auto", "cpu") as session:
        assert session.backend in choice.CANDIDATES
    assert "unreadable backend choice" in caplog.text and records(cache)[0]["ms"]


@needs_openvino
def test_a_runtime_that_cannot_run_the_graph_is_recorded_and_passed_over(artefact, cache, monkeypatch, caplog):
    from knnclip.engine.backends import openvino

    def fails(self, feed):
        raise RuntimeError("Exception from src/inference: unsupported operation")

    monkeypatch.setattr(openvino.OpenVinoSession, "_run", fails)
    with caplog.at_level(logging.WARNING), backends.open_session(artefact, "auto", "cpu") as session:
        assert session.backend == "onnxruntime" and "openvino could not run" in caplog.text
    (record,) = records(cache)
    assert record["backend"] == "onnxruntime" and "unsupported operation" in record["failed"]["openvino"]
    opens = Opens(monkeypatch)
    backends.open_session(artefact, "auto", "cpu").close()
    assert opens.names == ["onnxruntime"]


@needs_openvino
def test_a_recorded_winner_that_no_longer_opens_is_measured_again(artefact, cache, monkeypatch, caplog):
    from knnclip.engine.artifact import read_manifest
    from knnclip.engine.backends import openvino

    key = choice.machine_key(read_manifest(artefact), choice.CANDIDATES)
    path = choice.record_path(cache, key)
    choice.write_choice(choice.Choice("openvino", {"onnxruntime": 9.0, "openvino": 1.0}, path), key)

    def broken(*args, **kwargs):
        raise RuntimeError("libopenvino_intel_cpu_plugin.so: cannot open shared object file")

    monkeypatch.setattr(openvino, "OpenVinoSession", broken)
    with caplog.at_level(logging.WARNING), backends.open_session(artefact, "auto", "cpu") as session:
        assert session.backend == "onnxruntime"
    assert "does not open" in caplog.text
    (record,) = records(cache)
    assert record["backend"] == "onnxruntime" and "cannot open shared object" in record["failed"]["openvino"]


def test_measuring_can_be_turned_off(artefact, cache, monkeypatch):
    monkeypatch.setenv("KNNCLIP_AUTO_MEASURE", "0")
    opens = Opens(monkeypatch)
    with backends.open_session(artefact, "auto", "cpu") as session:
        assert session.backend == "onnxruntime" and session.selection is None
    assert opens.names == ["onnxruntime"] and not (cache / "backend-choice").exists()


def test_a_named_backend_is_never_measured(artefact, cache, monkeypatch):
    opens = Opens(monkeypatch)
    backends.open_session(artefact, "onnxruntime", "cpu").close()
    assert opens.names == ["onnxruntime"] and not (cache / "backend-choice").exists()


@needs_openvino
def test_a_cache_that_cannot_be_written_costs_the_record_not_the_session(artefact, cache, caplog):
    cache.mkdir(parents=True)
    (cache / "backend-choice").write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING), backends.open_session(artefact, "auto", "cpu") as session:
        assert session.backend in choice.CANDIDATES and "measured here now" in session.selection
    assert "could not record the backend choice" in caplog.text


@needs_openvino
def test_processes_starting_together_measure_once(artefact, cache):
    """Replicas that start at once: one measures under the lock, the others wait and read its record."""
    script = (
        "import sys\n"
        "from knnclip.engine.backends import open_session\n"
        "with open_session(sys.argv[1], 'auto', 'cpu') as session:\n"
        "    print(session.selection)\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(artefact)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        outputs.append(out)
    assert sum("measured here now" in out for out in outputs) == 1, outputs
    assert sum("measured here before" in out for out in outputs) == 2, outputs
    assert len(records(cache)) == 1


class TestDeviceAuto:
    """device="auto" picks CUDA only where a model backend can run there (stand-ins for the GPU
    and the runtimes: this machine has neither)."""

    def test_a_gpu_with_only_the_cpu_runtimes_runs_on_the_cpu_and_says_why(self, monkeypatch, caplog):
        import onnxruntime

        from knnclip.engine import backends, ops

        monkeypatch.setattr(ops, "cuda_available", lambda: True)  # the compiled ops see a GPU
        monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
        monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None)  # no TensorRT, no torch
        with caplog.at_level("WARNING"):
            assert backends.resolve_device("auto") == "cpu"
        assert "no model backend can use it" in caplog.text

    def test_a_gpu_with_onnxruntime_gpu_runs_on_cuda(self, monkeypatch):
        import onnxruntime

        from knnclip.engine import backends, ops

        monkeypatch.setattr(ops, "cuda_available", lambda: True)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: providers)
        monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None)
        assert backends.cuda_model_backends() == ["onnxruntime"] and backends.resolve_device("auto") == "cuda"

    def test_no_gpu_is_the_cpu_whatever_is_installed(self, monkeypatch):
        import onnxruntime

        from knnclip.engine import backends

        monkeypatch.setattr(backends, "gpu_present", lambda: False)
        monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider"])
        assert backends.resolve_device("auto") == "cpu" and backends.resolve_device("cuda") == "cuda"


def test_auto_moves_past_a_tensorrt_that_cannot_build(demo_models, monkeypatch, caplog):
    """A TensorRT build failure under backend="auto" is TensorRT's: ONNX Runtime runs the model
    (stand-ins for both on the CUDA device, which this machine has not)."""
    from knnclip.engine.backends.tensorrt.builder import EngineBuildError

    opened = []

    def fake_open(name, directory, manifest, device):
        opened.append(name)
        if name == "tensorrt":
            raise EngineBuildError("the ONNX parser failed: unsupported operator")
        return f"{name} session on {device}"

    monkeypatch.setattr(backends, "_open", fake_open)
    with caplog.at_level("WARNING"):
        session = backends.open_session(demo_models / "dinov2", "auto", "cuda")
    assert session == "onnxruntime session on cuda" and opened == ["tensorrt", "onnxruntime"]
    assert "TensorRT could not run" in caplog.text and "unsupported operator" in caplog.text
    with pytest.raises(EngineBuildError):  # named, it is the user's choice: the error stands
        backends.open_session(demo_models / "dinov2", "tensorrt", "cuda")
