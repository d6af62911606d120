"""ONNX Runtime sessions: the CPU execution provider everywhere, CUDA and TensorRT providers
where onnxruntime-gpu is installed.

On CUDA, :meth:`OrtSession.infer_device` takes inputs that already live on the GPU (anything
with ``__cuda_array_interface__`` or DLPack) and leaves the outputs there through IO binding;
:meth:`OrtSession.infer` takes and returns NumPy arrays.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from knnclip.engine.backends.base import Session
from knnclip.engine.errors import BackendUnavailableError

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def providers_for(device: str, cache_dir: Path | None = None) -> list[Any]:
    """ONNX Runtime's providers for ``device``; the TensorRT provider keeps its engines and timing
    cache in ``cache_dir`` (inside the engine cache), so it does not rebuild on every session."""
    wanted = _PROVIDERS.get(device)
    if wanted is None:
        raise ValueError(f"device must be one of {sorted(_PROVIDERS)}, got {device!r}")
    if wanted[0] != "TensorrtExecutionProvider":
        return list(wanted)
    from knnclip.engine.backends.tensorrt.cache import default_root

    cache = str(cache_dir or default_root() / "onnxruntime-tensorrt")
    options = {
        "trt_engine_cache_enable": "True", "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": "True", "trt_timing_cache_path": cache,
    }  # fmt: skip
    return [("TensorrtExecutionProvider", options), *wanted[1:]]


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


class OrtSession(Session):
    """An ``onnxruntime.InferenceSession`` over an artefact's ``model.onnx``.

    Thread safety: ONNX Runtime allows concurrent ``run`` calls on one session; the IO-binding
    path keeps one binding per thread.
    """

    backend = "onnxruntime"

    def __init__(
        self, directory: Path, manifest: dict[str, Any], device: str = "cpu", *, threads: int | None = None
    ) -> None:
        super().__init__(directory, manifest, device)
        import onnxruntime as ort

        wanted = providers_for(device)
        first = wanted[0][0] if isinstance(wanted[0], tuple) else wanted[0]
        if first not in ort.get_available_providers():
            raise BackendUnavailableError(
                f"ONNX Runtime here has no {first} (available: {ort.get_available_providers()}); "
                "install onnxruntime-gpu for CUDA/TensorRT, or use device='cpu'"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is None:
            threads = int(os.environ.get("KNNCLIP_ORT_THREADS", "0"))  # 0: one per physical core
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Spinning workers would keep the cores busy after each run, slowing the ops that follow.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # The arena keeps peak-size buffers for the next call: right for a server running one size.
        options.enable_cpu_mem_arena = True
        self._session = ort.InferenceSession(
            str(directory / manifest["files"]["model"]["name"]), sess_options=options, providers=wanted
        )
        self.providers = self._session.get_providers()
        self._output_names = [spec.name for spec in self.outputs]
        self._local = threading.local()

    def _run(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        arrays = {k: np.ascontiguousarray(v) for k, v in feed.items()}
        values = self._session.run(self._output_names, arrays)
        return dict(zip(self._output_names, values, strict=True))

    def infer_device(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        """Inputs on the GPU in, outputs left on the GPU (``OrtValue``; ``.numpy()`` copies to host)."""
        import onnxruntime as ort

        if self.device == "cpu":
            return self.infer(feed)
        self.validate(feed)
        binding = getattr(self._local, "binding", None)
        if binding is None:
            binding = self._local.binding = self._session.io_binding()
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for spec in self.inputs:
            value = feed[spec.name]
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(spec.name, value)
                continue
            interface = value.__cuda_array_interface__
            binding.bind_input(
                spec.name, "cuda", 0, spec.dtype.type, list(interface["shape"]), int(interface["data"][0])
            )
        for name in self._output_names:
            binding.bind_output(name, "cuda")
        self._session.run_with_iobinding(binding)
        outputs: list[ort.OrtValue] = binding.get_outputs()
        return dict(zip(self._output_names, outputs, strict=True))

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"OrtSession({self.kind}, providers={getattr(self, 'providers', None)}, {self.directory})"
