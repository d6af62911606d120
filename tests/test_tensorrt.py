"""The TensorRT backend on a GPU: engine built from the exported ONNX, outputs against ONNX
Runtime. Collected everywhere, skipped with a reason where TensorRT or a GPU is missing."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from knnclip.engine.errors import BackendUnavailableError

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
    from tests.fcclip_helpers import load_fixture

    monkeypatch.setenv("KNNCLIP_ENGINE_CACHE", str(tmp_path / "engines"))
    fx = load_fixture("fcclip")
    export_fcclip_onnx(fx.model, tmp_path / "fc", size=fx.padded)
    feed = {"images": fx.io["input_tensor"]}
    ref = open_session(tmp_path / "fc" / "image", "onnxruntime", "cpu").infer(feed)
    trt = open_session(tmp_path / "fc" / "image", "tensorrt", "cuda").infer(feed)
    for name, value in ref.items():
        assert np.linalg.norm(trt[name] - value) / np.linalg.norm(value) <= 1e-3, name
