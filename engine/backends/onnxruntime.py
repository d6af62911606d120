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

from knnclip.engine.artifact import Manifest
from knnclip.engine.backends.base import Session
from knnclip.engine.backends.device_buffer import DeviceBuffer, cuda_array, device_input
from knnclip.engine.errors import BackendUnavailableError, InvalidInputError

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


def split_device(device: str) -> tuple[str, int]:
    """``"cuda:1"`` -> ``("cuda", 1)``; ``"cuda"`` is device 0, ``"cpu"`` has none."""
    kind, _, index = device.partition(":")
    if index and not index.isdigit():
        raise ValueError(f"a device index must be a number, got {device!r}")
    return kind, int(index or 0)


def providers_for(device: str, dynamic_shapes: bool = False) -> list[Any]:
    """ONNX Runtime's providers for ``device`` (``cuda:N`` picks the GPU). The CUDA provider runs
    on the device's index; for graphs whose input sizes change from call to call
    (``dynamic_shapes``) it picks convolution algorithms by heuristics and grows its arena by
    what is asked, instead of benchmarking every new shape and keeping power-of-two blocks.
    (TensorRT runs through the tensorrt backend, with its own engine cache, not this provider.)"""
    kind, index = split_device(device)
    wanted = _PROVIDERS.get(kind)
    if wanted is None:
        raise ValueError(f"device must be one of {sorted(_PROVIDERS)}, got {device!r}")
    cuda: dict[str, Any] = {"device_id": str(index)}
    if dynamic_shapes:
        cuda |= {"cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested"}
    return [("CUDAExecutionProvider", cuda) if p == "CUDAExecutionProvider" else p for p in wanted]


class OrtSession(Session):
    """An ``onnxruntime.InferenceSession`` over an artefact's ``model.onnx``.

    Thread safety: ONNX Runtime allows concurrent ``run`` calls on one session; the IO-binding
    path keeps one binding per thread.
    """

    backend = "onnxruntime"

    def __init__(self, directory: Path, manifest: Manifest, device: str = "cpu", *, threads: int | None = None) -> None:
        kind, device_id = split_device(device)
        super().__init__(directory, manifest, kind)
        import onnxruntime as ort

        dynamic = any(isinstance(d, str) and d in ("height", "width") for s in self.inputs for d in s.shape)
        wanted = providers_for(device, dynamic_shapes=dynamic)
        first = wanted[0][0] if isinstance(wanted[0], tuple) else wanted[0]
        if first not in ort.get_available_providers():
            raise BackendUnavailableError(
                f"ONNX Runtime here has no {first} (available: {ort.get_available_providers()}); "
                "install onnxruntime-gpu for CUDA/TensorRT, or use device='cpu'"
            )
        if kind != "cpu" and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # the CUDA and cuDNN libraries of the nvidia-* wheels, where installed
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
            str(directory / manifest.files["model"].name), sess_options=options, providers=wanted
        )
        self.providers = self._session.get_providers()
        if first not in self.providers:
            # ONNX Runtime falls back to the CPU when a provider's libraries fail to load, and only
            # logs it: a "cuda" session would then run on the CPU while claiming the GPU.
            self._session = None
            raise BackendUnavailableError(
                f"ONNX Runtime could not start its {first} for {directory} (it fell back to {self.providers}): "
                "the CUDA runtime or cuDNN libraries it needs are missing or of another version; install the "
                "versions onnxruntime-gpu was built for (docs/backends.md), or use device='cpu'"
            )
        self._output_names = [spec.name for spec in self.outputs]
        self._local = threading.local()
        self.device_id = device_id

    def _run(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        arrays = {k: np.ascontiguousarray(v) for k, v in feed.items()}
        values = self._session.run(self._output_names, arrays)
        return dict(zip(self._output_names, values, strict=True))

    @property
    def device_outputs(self) -> bool:
        return self.device == "cuda"

    def infer_device(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        """Inputs on the GPU in, outputs left on the GPU: :class:`DeviceBuffer` views of the
        ``OrtValue`` each output was bound to (which they keep alive). On the CPU, :meth:`infer`."""
        if self.device == "cpu":
            return self.infer(feed)
        # DLPack-only inputs read as CUDA arrays first, so that validation sees their shape and dtype.
        feed = {name: v if isinstance(v, np.ndarray) else cuda_array(v, name) for name, v in feed.items()}
        self.validate(feed)
        binding = getattr(self._local, "binding", None)
        if binding is None:
            binding = self._local.binding = self._session.io_binding()
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        kept = []  # the inputs' owners live until the run is done
        for spec in self.inputs:
            value = feed[spec.name]
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(spec.name, value)
                continue
            item = device_input(value, spec.name, spec.dtype)
            if item.device_id != self.device_id:
                raise InvalidInputError(
                    f"{self}: input {spec.name!r} is on cuda:{item.device_id}, the session on cuda:{self.device_id}"
                )
            binding.bind_input(spec.name, "cuda", item.device_id, spec.dtype.type, list(item.shape), item.pointer)
            kept.append(item.keep)
        for name in self._output_names:
            binding.bind_output(name, "cuda", self.device_id)
        # ONNX Runtime computes on a stream of its own: inputs still being copied on the default
        # stream must land first.
        binding.synchronize_inputs()
        self._session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return {
            name: ort_value_buffer(value, self.device_id)
            for name, value in zip(self._output_names, binding.get_outputs(), strict=True)
        }

    def close(self) -> None:
        self._session = None

    def __repr__(self) -> str:
        return f"OrtSession({self.kind}, providers={getattr(self, 'providers', None)}, {self.directory})"


def ort_value_buffer(value: Any, device_id: int) -> DeviceBuffer:
    """An ``OrtValue`` on a CUDA device as a :class:`DeviceBuffer` that keeps it alive."""
    name = ORT_ELEMENT_TYPES.get(value.data_type())
    if name is None:
        raise BackendUnavailableError(f"an ONNX Runtime output of type {value.data_type()} has no NumPy dtype here")
    dtype = np.dtype(name)
    return DeviceBuffer(value.data_ptr(), tuple(value.shape()), dtype, device_id, value)


# OrtValue.data_type() strings of the tensor types the models produce
ORT_ELEMENT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
    "tensor(uint8)": "uint8",
}
