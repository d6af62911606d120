"""Shared fixtures: hypothesis profile, every compiled CPU instruction set, and devices.

The cpu_isa and device fixtures set state that holds for every example hypothesis draws within
one test, which is what they are for; hence the function_scoped_fixture health check is off.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from knnclip import _C

# Ray instances that tests start in this process stay on loopback: Ray turns 127.0.0.1 into the
# machine's interface address unless it runs single-machine, a switch it reads when imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# What a test file imports at its top, beyond the base install, by file (or folder) under tests/.
# A file whose needs are missing is skipped with the reason instead of failing to import, so
# the files themselves import plainly at the top.
NEEDS: dict[str, tuple[str, ...]] = {
    "export": ("torch", "onnx"),
    "bench/test_bench.py": ("torch", "onnx"),
    "backends/test_openvino.py": ("openvino", "torch"),
    "cli/test_cli_outputs.py": ("torch",),
    "database/test_database_bf16.py": ("openvino",),
    "demo/test_demo.py": ("torch", "onnx"),
    "eval/test_evaluation.py": ("torch", "onnx"),
    "eval/test_instance.py": ("pycocotools",),
    "pipeline/test_device_pipeline.py": ("torch", "onnx"),
    "pipeline/test_segmenter.py": ("torch", "onnx"),
    "serve/test_serve.py": ("fastapi", "httpx", "torch"),
    "serve/test_serve_hostile.py": ("fastapi", "httpx"),
    "video/test_video.py": ("av", "pycocotools", "torch"),
    "test_docs.py": ("torch", "onnx"),
    "test_formats.py": ("torch", "pycocotools"),
    "test_result_record.py": ("pycocotools",),
}
INSTALL = {
    "torch": "pip install torch==2.13.0",
    "onnx": 'pip install ".[export]"',
    "openvino": 'pip install ".[openvino]"',
    "fastapi": 'pip install ".[serve]"',
    "httpx": 'pip install ".[serve]"',
    "av": 'pip install ".[video]"',
    "pycocotools": 'pip install ".[video]"',
}
TESTS = Path(__file__).resolve().parent


class MissingNeeds(pytest.Module):
    """A test file whose imports are not installed: collected as one skip that names them."""

    missing: tuple[str, ...] = ()

    def collect(self) -> list:
        hints = sorted({INSTALL[m] for m in self.missing})
        pytest.skip(f"needs {', '.join(self.missing)} ({'; '.join(hints)})")


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    rel = module_path.resolve().relative_to(TESTS).as_posix()
    needs = [m for key, ms in NEEDS.items() if rel == key or rel.startswith(key + "/") for m in ms]
    missing = tuple(m for m in dict.fromkeys(needs) if importlib.util.find_spec(m) is None)
    if not missing:
        return None
    module = MissingNeeds.from_parent(parent, path=module_path)
    module.missing = missing
    return module


_SUPPRESSED = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
settings.register_profile("default", max_examples=60, deadline=None, suppress_health_check=_SUPPRESSED)
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=_SUPPRESSED)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

CUDA = _C.cuda_available()
NO_CUDA_REASON = "no usable CUDA device" if _C.build_info()["cuda"] else "knnclip._C was built without CUDA kernels"


@pytest.fixture(scope="session", autouse=True)
def engine_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One engine cache for the run (compiled OpenVINO models, backend choices), not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        root = tmp_path_factory.mktemp("engines")
        patch.setenv("KNNCLIP_ENGINE_CACHE", str(root))
        yield root


@pytest.fixture(params=_C.supported_cpu_isas())
def cpu_isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test once per instruction set the CPU kernels were compiled for."""
    previous = _C.cpu_isa()
    _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa(previous)


def _cuda_array_module():
    """torch or CuPy, whichever can hold CUDA arrays here (only called when CUDA is usable)."""
    try:
        import torch

        if torch.cuda.is_available():
            return "torch"
    except ImportError:
        pass
    try:
        import cupy  # noqa: F401

        return "cupy"
    except ImportError:
        return None


class Device:
    """Moves NumPy inputs to where an op runs and its results back, for one device kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.module = _cuda_array_module() if kind == "cuda" else None

    def put(self, array: np.ndarray):
        if self.kind == "cpu":
            return array
        if self.module == "torch":
            import torch

            return torch.from_numpy(np.ascontiguousarray(array)).cuda()
        import cupy

        return cupy.asarray(array)

    def get(self, result) -> np.ndarray:
        if self.kind == "cpu":
            assert isinstance(result, np.ndarray)
            return result
        assert isinstance(result, _C.DeviceArray)
        return result.numpy()


@pytest.fixture(
    params=[
        "cpu",
        pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason=NO_CUDA_REASON)]),
    ]
)
def device(request: pytest.FixtureRequest) -> Device:
    """Run the test with host arrays and, where a GPU is usable, with CUDA arrays."""
    dev = Device(request.param)
    if dev.kind == "cuda" and dev.module is None:
        pytest.skip("a CUDA device is present but neither torch with CUDA nor CuPy is installed")
    return dev


@pytest.fixture(scope="session")
def fixture_io() -> dict[str, np.ndarray]:
    """The DINOv2 parity fixture's arrays (image, keys, patch, cls, registers)."""
    from tests.support.fixture_files import fixture_dir

    return dict(np.load(fixture_dir("dinov2") / "io.npz"))


@pytest.fixture(scope="session")
def tokenizer():
    """CLIP's tokenizer with the real BPE merges (from the open_clip_torch distribution)."""
    from knnclip.engine.errors import ModelFileError
    from knnclip.engine.text.tokenizer import ClipTokenizer

    try:
        return ClipTokenizer()
    except ModelFileError as exc:
        pytest.skip(f"CLIP's BPE vocabulary is not installed ({exc})")


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory) -> Path:
    """The demo's seeded models, exported once per test session (torch needed)."""
    pytest.importorskip("torch", reason="the models are built with torch (pip install torch)")
    from knnclip.engine.demo.run import DemoSettings, build_models

    return build_models(DemoSettings(out=tmp_path_factory.mktemp("demo")), say=lambda _: None)
