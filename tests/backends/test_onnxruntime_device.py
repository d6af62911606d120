"""ONNX Runtime's device inputs, on the CPU with stand-in CUDA arrays: the address, shape and
device IO binding gets, strides honoured or refused, a producer's stream synchronised first."""

from __future__ import annotations

import numpy as np
import pytest

from knnclip.engine.backends.device_buffer import device_input
from knnclip.engine.errors import InvalidInputError
from tests.support.manifests import stand_in_manifest
from tests.support.standin_device import FakeCudaArray


def test_address_shape_and_device():
    a = FakeCudaArray((2, 3, 4), device=1)
    item = device_input(a, "x", np.dtype(np.float32))
    assert item.pointer == a.array.ctypes.data and item.shape == (2, 3, 4) and item.device_id == 1 and item.keep is a


def test_c_contiguous_strides_are_accepted_and_others_made_contiguous_or_refused():
    dense = FakeCudaArray((2, 3), strides=(12, 4))
    assert device_input(dense, "x", np.dtype(np.float32)).shape == (2, 3)
    dense_copy = FakeCudaArray((3, 2))
    transposed = FakeCudaArray((2, 3), strides=(4, 8))
    transposed.contiguous = lambda: dense_copy  # the producer library's own copy
    assert device_input(transposed, "x", np.dtype(np.float32)).pointer == dense_copy.array.ctypes.data
    with pytest.raises(InvalidInputError, match="not contiguous"):
        device_input(FakeCudaArray((2, 3), strides=(4, 8)), "x", np.dtype(np.float32))


def test_wrong_dtype_is_refused():
    with pytest.raises(InvalidInputError, match="float16"):
        device_input(FakeCudaArray((2,), np.float16), "x", np.dtype(np.float32))


@pytest.mark.parametrize(("stream", "synchronised"), [(None, []), (1, []), (2, []), (0x7F00, [0x7F00])])
def test_a_producers_side_stream_is_synchronised(stream, synchronised):
    seen: list[int] = []
    device_input(FakeCudaArray((2,), stream=stream), "x", np.dtype(np.float32), synchronize=seen.append)
    assert seen == synchronised


def test_neither_cai_nor_dlpack_is_refused():
    with pytest.raises(InvalidInputError, match="CUDA array"):
        device_input([1.0, 2.0], "x", np.dtype(np.float32))


class FakeOrtValue:
    """An OrtValue on a CUDA device, as IO binding's get_outputs hands it back."""

    def __init__(self, kind="tensor(float)"):
        self.kind = kind

    def data_ptr(self):
        return 0x7F0000001000

    def shape(self):
        return [1, 250, 64, 96]

    def data_type(self):
        return self.kind


class _FakeBinding:
    def __init__(self, log):
        self.log = log

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.log.append(name)

    def get_outputs(self):
        return [FakeOrtValue()]


class _FakeInferenceSession:
    """onnxruntime.InferenceSession as the CUDA build behaves: ``loaded`` says which providers
    really started (a provider whose libraries fail to load is dropped, with only a log line)."""

    loaded: list[str] = []
    created: list = []

    def __init__(self, path, sess_options=None, providers=()):
        self.providers = providers
        self.log: list[str] = []
        _FakeInferenceSession.created.append(self)

    def get_providers(self):
        return list(self.loaded)

    def io_binding(self):
        return _FakeBinding(self.log)

    def run_with_iobinding(self, binding):
        self.log.append("run")


@pytest.fixture
def cuda_build(monkeypatch):
    """onnxruntime with a stand-in session class and the CUDA provider listed as available."""
    import onnxruntime

    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(onnxruntime, "InferenceSession", _FakeInferenceSession)
    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda: None, raising=False)
    _FakeInferenceSession.created = []
    return _FakeInferenceSession


MANIFEST = stand_in_manifest(
    {
        "kind": "test-image",
        "files": {"model": {"name": "model.onnx", "bytes": 1, "sha256": "0" * 64}},
        "inputs": [{"name": "images", "shape": ["batch", 3, "height", "width"], "dtype": "float32"}],
        "outputs": [{"name": "mask_logits", "shape": ["batch", 50, "h4", "w4"], "dtype": "float32"}],
    }
)


def test_a_cuda_session_that_fell_back_to_the_cpu_is_refused(cuda_build, tmp_path):
    from knnclip.engine.backends.onnxruntime import OrtSession
    from knnclip.engine.errors import BackendUnavailableError

    cuda_build.loaded = ["CPUExecutionProvider"]  # libcudnn could not be loaded
    with pytest.raises(BackendUnavailableError, match="fell back to"):
        OrtSession(tmp_path, MANIFEST, "cuda")


def test_dynamic_graphs_get_heuristic_algorithms_and_exact_arena_growth_on_their_device(cuda_build, tmp_path):
    from knnclip.engine.backends.onnxruntime import OrtSession

    cuda_build.loaded = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    session = OrtSession(tmp_path, MANIFEST, "cuda:1")
    (name, options), *_ = cuda_build.created[0].providers
    assert name == "CUDAExecutionProvider" and session.device_id == 1 and options["device_id"] == "1"
    assert options["cudnn_conv_algo_search"] == "HEURISTIC" and options["arena_extend_strategy"] == "kSameAsRequested"


def test_bound_inputs_are_synchronised_before_the_run(cuda_build, tmp_path):
    from knnclip.engine.backends.onnxruntime import OrtSession

    cuda_build.loaded = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    session = OrtSession(tmp_path, MANIFEST, "cuda")
    out = session.infer_device({"images": FakeCudaArray((1, 3, 64, 64))})
    assert session.device_outputs and all(v.__cuda_array_interface__["shape"] == (1, 250, 64, 96) for v in out.values())
    log = cuda_build.created[0].log
    assert "synchronize_inputs" in log and log.index("synchronize_inputs") < log.index("run"), log


def test_an_ort_value_on_the_device_becomes_a_buffer_that_keeps_it():
    """What ONNX Runtime's IO binding hands back (an OrtValue on CUDA) is exposed to torch and
    CuPy through __cuda_array_interface__ with its address, shape and dtype, and kept alive."""
    from knnclip.engine.backends.onnxruntime import ort_value_buffer
    from knnclip.engine.errors import BackendUnavailableError

    value = FakeOrtValue("tensor(float16)")
    buffer = ort_value_buffer(value, 1)
    cai = buffer.__cuda_array_interface__
    assert cai["data"] == (0x7F0000001000, False) and cai["shape"] == (1, 250, 64, 96) and cai["typestr"] == "<f2"
    assert buffer.owner is value and buffer.__dlpack_device__() == (2, 1) and buffer.nbytes == 250 * 64 * 96 * 2
    with pytest.raises(BackendUnavailableError, match="tensor\\(string\\)"):
        ort_value_buffer(FakeOrtValue("tensor(string)"), 0)


def test_the_ops_prefer_dlpack_where_the_array_interface_names_no_stream():
    """torch exports __cuda_array_interface__ version 2, without the producer's stream: the ops'
    own stream could not wait for it, so such arrays are read through DLPack (stream= the ops'
    stream); an interface that names its stream (v3, CuPy, the engine's DeviceBuffers) is used."""
    from knnclip import _C

    class TorchLike(FakeCudaArray):
        @property
        def __cuda_array_interface__(self):
            cai = dict(super().__cuda_array_interface__)
            del cai["stream"]
            cai["version"] = 2
            return cai

        def __dlpack__(self, stream=None):
            raise AssertionError("not called by input_protocol")

    class CupyLike(TorchLike):
        @property
        def __cuda_array_interface__(self):
            return {**super().__cuda_array_interface__, "version": 3, "stream": 1}

    assert _C.input_protocol(TorchLike((2,))) == "dlpack"
    assert _C.input_protocol(CupyLike((2,))) == "cuda_array_interface"
    assert _C.input_protocol(FakeCudaArray((2,))) == "cuda_array_interface"  # no DLPack offered
    assert _C.input_protocol(np.zeros(2, np.float32)) == "numpy"
    assert _C.input_protocol([1.0]) == "none"
