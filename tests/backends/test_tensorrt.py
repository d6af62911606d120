"""The TensorRT backend on a GPU: engine built from the exported ONNX, outputs against ONNX
Runtime. Collected everywhere, skipped with a reason where TensorRT or a GPU is missing."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from knnclip.engine.errors import BackendUnavailableError
from tests.support.manifests import stand_in_manifest

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and importlib.util.find_spec("pycuda") is not None
needs_trt = pytest.mark.skipif(
    not HAVE_TRT, reason="TensorRT and pycuda are not installed (pip install knnclip[tensorrt])"
)


def test_cpu_device_is_refused_with_a_reason(tmp_path):
    from knnclip.engine.backends.tensorrt.session import open_tensorrt

    with pytest.raises(BackendUnavailableError, match="CUDA devices only"):
        open_tensorrt(tmp_path, {}, "cpu")


@needs_trt
@pytest.mark.gpu
def test_engine_matches_onnxruntime(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from knnclip.engine.backends import open_session
    from knnclip.export.fcclip.onnx import export_fcclip_onnx
    from tests.support.fcclip_helpers import load_fixture

    monkeypatch.setenv("KNNCLIP_ENGINE_CACHE", str(tmp_path / "engines"))
    fx = load_fixture("fcclip")
    export_fcclip_onnx(fx.model, tmp_path / "fc", size=fx.padded)
    feed = {"images": fx.io["input_tensor"]}
    ref = open_session(tmp_path / "fc" / "image", "onnxruntime", "cpu").infer(feed)
    trt = open_session(tmp_path / "fc" / "image", "tensorrt", "cuda").infer(feed)
    for name, value in ref.items():
        assert np.linalg.norm(trt[name] - value) / np.linalg.norm(value) <= 1e-3, name


class _Buffer:
    allocations: list[int] = []
    freed_in: list | None = None  # a log the frees are written to, beside the context's pushes and pops

    def __init__(self, nbytes: int) -> None:
        self.nbytes, self.freed = nbytes, False
        _Buffer.allocations.append(nbytes)

    def __int__(self) -> int:
        return id(self)

    def free(self) -> None:
        self.freed = True
        if _Buffer.freed_in is not None:
            _Buffer.freed_in.append("free")


class _Context:
    """TensorRT's execution context for a graph images [batch, 3, H, W] -> masks [batch, 5, H/4, W/4]."""

    def __init__(self) -> None:
        self.shapes: dict = {}
        self.addresses: dict = {}

    def set_input_shape(self, name, shape) -> bool:
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        b, _, h, w = self.shapes["images"]
        return (b, 3, h, w) if name == "images" else (b, 5, h // 4, w // 4)

    def set_tensor_address(self, name, address) -> bool:
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream) -> bool:
        return True


class _Engine:
    num_io_tensors = 2

    def __init__(self) -> None:
        self.context = _Context()

    def get_tensor_name(self, i):
        return ("images", "masks")[i]

    def get_tensor_dtype(self, name):
        return "float32"

    def get_tensor_mode(self, name):
        return "input" if name == "images" else "output"

    def get_tensor_profile_shape(self, name, profile):
        return (1, 3, 32, 32), (4, 3, 800, 1088), (4, 3, 1344, 1344)

    def create_execution_context(self):
        return self.context


# An image graph with dynamic batch and spatial axes: images [batch, 3, H, W] -> masks [batch, 5, H/4, W/4].
IMAGE_MANIFEST = stand_in_manifest(
    {
        "kind": "test-image",
        "inputs": [{"name": "images", "shape": ["batch", 3, "height", "width"], "dtype": "float32"}],
        "outputs": [{"name": "masks", "shape": ["batch", 5, "height/4", "width/4"], "dtype": "float32"}],
    }
)
_PINNED: list[int] = []


def _pinned(shape, dtype) -> np.ndarray:
    _PINNED.append(int(np.prod(shape)) * np.dtype(dtype).itemsize)
    return np.zeros(shape, dtype)


def fake_tensorrt_modules(monkeypatch, engine: _Engine, pushes: list) -> None:
    """Stand-ins for the parts of tensorrt and pycuda the session uses, recording what it asks."""
    import sys
    import types

    trt = types.ModuleType("tensorrt")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.Runtime = type(
        "Runtime", (), {"__init__": lambda self, logger: None, "deserialize_cuda_engine": lambda self, plan: engine}
    )
    trt.nptype = lambda dtype: np.float32
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input")
    context = types.SimpleNamespace(
        push=lambda: pushes.append("push"), pop=lambda: pushes.append("pop"), detach=lambda: pushes.append("detach")
    )
    cuda = types.ModuleType("pycuda.driver")
    cuda.init = lambda: None
    cuda.Device = lambda i: types.SimpleNamespace(retain_primary_context=lambda: context)
    cuda.Stream = lambda flags=0: (
        pushes.append(("stream flags", flags))
        or types.SimpleNamespace(handle=0, synchronize=lambda: pushes.append("sync"))
    )
    cuda.mem_alloc = _Buffer
    device_memory: dict[int, bytes] = {}

    def htod(dst, src, stream):  # records what reached the device
        device_memory[int(dst)] = bytes(src)

    def dtoh(dst, src, stream):  # the "device" answers with a recognisable byte pattern
        dst[:] = np.frombuffer(bytes([int(src) % 251]) * dst.nbytes, np.uint8)

    cuda.memcpy_htod_async = htod
    cuda.memcpy_dtoh_async = dtoh
    cuda.pagelocked_empty = lambda shape, dtype: _pinned(shape, dtype)
    cuda.device_memory = device_memory
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = cuda
    for name, module in (("tensorrt", trt), ("pycuda", pycuda), ("pycuda.driver", cuda)):
        monkeypatch.setitem(sys.modules, name, module)


def test_output_buffers_follow_the_shapes_tensorrt_resolves(monkeypatch, tmp_path):
    """A dynamic batch and spatial size: each call's output buffer holds what the context reports
    for that call (the old sizing turned the dynamic axes into 1), grown only when needed, and the
    primary context is pushed and popped around every call."""
    from knnclip.engine.backends.tensorrt.session import TensorRTSession
    from knnclip.engine.errors import InvalidInputError

    engine, pushes = _Engine(), []
    fake_tensorrt_modules(monkeypatch, engine, pushes)
    manifest = IMAGE_MANIFEST
    _Buffer.allocations = []
    session = TensorRTSession(tmp_path, manifest, b"plan")
    out = session.infer({"images": np.zeros((2, 3, 64, 96), np.float32)})
    assert out["masks"].shape == (2, 5, 16, 24)
    assert _Buffer.allocations == [2 * 3 * 64 * 96 * 4, 2 * 5 * 16 * 24 * 4]
    session.infer({"images": np.zeros((1, 3, 32, 32), np.float32)})  # smaller: the buffers are reused
    assert len(_Buffer.allocations) == 2
    out = session.infer({"images": np.zeros((4, 3, 128, 160), np.float32)})  # larger: grown
    assert out["masks"].shape == (4, 5, 32, 40) and _Buffer.allocations[-1] == 4 * 5 * 32 * 40 * 4
    assert [p for p in pushes if p != "sync"] == ["push", ("stream flags", 1), "pop"] + ["push", "pop"] * 3, pushes
    with pytest.raises(InvalidInputError, match="outside the engine's profile"):
        session.infer({"images": np.zeros((5, 3, 64, 96), np.float32)})
    engine.context.set_input_shape = lambda name, shape: False
    with pytest.raises(InvalidInputError, match="refused the shape"):
        session.infer({"images": np.zeros((1, 3, 64, 96), np.float32)})
    session.close()


def test_close_frees_under_the_sessions_context_and_a_closed_session_says_so(monkeypatch, tmp_path):
    """Device memory is freed with its context current, after the stream drained; the retained
    primary context is released; the stream is non-blocking (CU_STREAM_NON_BLOCKING = 1)."""
    from knnclip.engine.backends.tensorrt.session import TensorRTSession
    from knnclip.engine.errors import BackendUnavailableError

    engine, pushes = _Engine(), []
    fake_tensorrt_modules(monkeypatch, engine, pushes)
    session = TensorRTSession(tmp_path, IMAGE_MANIFEST, b"plan")
    session.infer({"images": np.zeros((1, 3, 32, 32), np.float32)})
    assert ("stream flags", 1) in pushes
    pushes.clear()
    _Buffer.freed_in = pushes
    try:
        session.close()
    finally:
        _Buffer.freed_in = None
    assert pushes == ["push", "sync", "free", "free", "pop", "detach"], pushes
    session.close()  # a second close changes nothing
    assert pushes[-1] == "detach" and pushes.count("detach") == 1
    with pytest.raises(BackendUnavailableError, match="closed"):
        session.infer({"images": np.zeros((1, 3, 32, 32), np.float32)})


def test_host_copies_go_through_reused_page_locked_buffers(monkeypatch, tmp_path):
    """Inputs reach the device byte for byte from page-locked staging, outputs come back with
    their shape and dtype, and the pinned buffers are allocated once per tensor and grown only
    for a larger call."""
    import sys

    from knnclip.engine.backends.tensorrt.session import TensorRTSession

    engine, pushes = _Engine(), []
    fake_tensorrt_modules(monkeypatch, engine, pushes)
    manifest = IMAGE_MANIFEST
    _PINNED.clear()
    session = TensorRTSession(tmp_path, manifest, b"plan")
    images = np.random.default_rng(0).standard_normal((2, 3, 64, 96)).astype(np.float32)
    out = session.infer({"images": images})
    assert _PINNED == [images.nbytes, out["masks"].nbytes]
    device = sys.modules["pycuda.driver"].device_memory
    assert images.tobytes() in device.values()
    assert out["masks"].shape == (2, 5, 16, 24) and out["masks"].dtype == np.float32
    first = out["masks"].copy()
    again = session.infer({"images": images[:1]})["masks"]  # smaller: staging reused
    assert _PINNED == [images.nbytes, first.nbytes] and again.shape == (1, 5, 16, 24)
    assert np.array_equal(first, out["masks"]), "a result does not change when the staging is reused"
    session.infer({"images": np.zeros((4, 3, 64, 96), np.float32)})  # larger: grown
    assert len(_PINNED) == 4
    session.close()


def test_auto_backend_falls_back_when_a_runtime_fails_to_open(monkeypatch, tmp_path, caplog):
    """A provider or driver failure while creating a session moves 'auto' on to the next backend
    with a warning; naming the backend still raises it."""
    pytest.importorskip("torch", reason="the fallback here is the torch backend")
    from knnclip.engine import backends
    from knnclip.engine.backends import onnxruntime as ort_backend
    from knnclip.engine.demo.models import seeded_dinov2
    from knnclip.export.dinov2.onnx import export_dinov2_onnx

    export_dinov2_onnx(seeded_dinov2(), tmp_path / "dinov2", size=56, torch_weights=True)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")

    monkeypatch.setattr(ort_backend, "OrtSession", broken)
    monkeypatch.setenv("KNNCLIP_AUTO_MEASURE", "0")  # the fixed order (else OpenVINO, where installed)
    with caplog.at_level("WARNING"):
        session = backends.open_session(tmp_path / "dinov2", "auto", "cpu")
    assert session.backend == "torch" and "onnxruntime could not open" in caplog.text
    session.close()
    with pytest.raises(RuntimeError, match="insufficient"):
        backends.open_session(tmp_path / "dinov2", "onnxruntime", "cpu")


def test_device_outputs_stay_on_the_device_in_buffers_of_their_own(monkeypatch, tmp_path):
    """infer_device: a CUDA input is read in place (its address given to TensorRT, nothing copied
    in), each output is a fresh allocation handed over as a DeviceBuffer with the shape TensorRT
    resolved, so a second call cannot overwrite the first one's outputs, and nothing is copied out."""
    import gc
    import sys

    from knnclip.engine.backends.device_buffer import DeviceBuffer
    from knnclip.engine.backends.tensorrt.session import TensorRTSession
    from tests.support.standin_device import FakeCudaArray

    engine, pushes = _Engine(), []
    fake_tensorrt_modules(monkeypatch, engine, pushes)
    _PINNED.clear()
    session = TensorRTSession(tmp_path, IMAGE_MANIFEST, b"plan")
    assert session.device_outputs
    images = FakeCudaArray((2, 3, 64, 96))
    first = session.infer_device({"images": images})["masks"]
    second = session.infer_device({"images": images})["masks"]
    assert isinstance(first, DeviceBuffer) and first.shape == (2, 5, 16, 24) and first.dtype == np.float32
    assert first.pointer != second.pointer and first.owner is not second.owner
    assert first.__cuda_array_interface__["data"] == (first.pointer, False)
    assert engine.context.addresses["images"] == images.array.ctypes.data, "the input is read in place"
    assert sys.modules["pycuda.driver"].device_memory == {} and _PINNED == [], "no host copy either way"
    # An output let go of is reused by the next call of its size: no allocation (and free) per call.
    released, allocated = first.pointer, len(_Buffer.allocations)
    del first
    gc.collect()
    third = session.infer_device({"images": images})["masks"]
    assert third.pointer == released and len(_Buffer.allocations) == allocated
    assert third.pointer != second.pointer, "one still held is never handed out again"
    del second
    gc.collect()
    pushes.clear()
    _Buffer.freed_in = pushes
    try:
        session.close()  # the spare output is freed under the session's context
    finally:
        _Buffer.freed_in = None
    assert pushes[:3] == ["push", "sync", "free"] and pushes[-2:] == ["pop", "detach"], pushes
