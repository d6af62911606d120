"""The TensorRT backend: an engine for this GPU from the engine cache (built on first use when
the export side is installed), run with ``execute_async_v3`` on its own CUDA stream.

Buffers: pycuda (cuda-python would do as well). Device buffers for
every I/O tensor are allocated once, at the profile's largest shapes, and reused.

Thread safety: one execution context and one set of buffers per session, guarded by a lock, so
concurrent ``infer`` calls run one after another; open one session per thread for parallel work.

Not yet run on a GPU (TensorRT cannot be installed where this was written); its tests skip.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from knnclip.engine.backends.base import Session
from knnclip.engine.backends.tensorrt.cache import EngineCache
from knnclip.engine.errors import ArtifactCorruptError, BackendUnavailableError, InvalidInputError


def open_tensorrt(directory: Path, manifest: dict[str, Any], device: str) -> TensorRTSession:
    if device != "cuda":
        raise BackendUnavailableError("TensorRT runs on CUDA devices only")
    try:
        from knnclip.engine.backends.tensorrt.builder import BuildSettings, build_engine, engine_key, import_tensorrt
    except ImportError as exc:
        raise BackendUnavailableError(f"the TensorRT backend needs the export side ({exc})") from None
    trt = import_tensorrt()
    settings = BuildSettings(precision=manifest.get("precision", "fp32"))
    key = engine_key(manifest, settings, trt.__version__)
    plan = EngineCache().get_or_build(key, lambda: build_engine(directory, settings), {"onnx_dir": str(directory)})
    return TensorRTSession(directory, manifest, plan)


class TensorRTSession(Session):
    backend = "tensorrt"

    def __init__(self, directory: Path, manifest: dict[str, Any], plan: bytes) -> None:
        super().__init__(directory, manifest, "cuda")
        import pycuda.autoinit  # noqa: F401 - creates the CUDA context
        import pycuda.driver as cuda
        import tensorrt as trt

        self._cuda = cuda
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise ArtifactCorruptError(
                directory, "TensorRT could not deserialise the cached engine (another TensorRT version or GPU?); "
                "delete ~/.cache/knnclip/engines or run `knnclip build` again"
            )  # fmt: skip
        self._context = self._engine.create_execution_context()
        self._stream = cuda.Stream()
        self._lock = threading.Lock()
        self._buffers: dict[str, Any] = {}
        self._max_shapes: dict[str, tuple[int, ...]] = {}
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                _, _, largest = self._engine.get_tensor_profile_shape(name, 0)
                self._max_shapes[name] = tuple(largest)
            else:
                largest = tuple(abs(d) for d in self._engine.get_tensor_shape(name))
            self._buffers[name] = cuda.mem_alloc(int(np.prod(self._max_shape(largest))) * dtype.itemsize)
            self._context.set_tensor_address(name, int(self._buffers[name]))

    def _max_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Outputs' dynamic (batch) axes take the inputs' largest batch."""
        batch = max((s[0] for s in self._max_shapes.values()), default=1)
        return tuple(batch if d in (0, -1) else d for d in shape)

    def _run(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        cuda = self._cuda
        with self._lock:
            for spec in self.inputs:
                array = np.ascontiguousarray(feed[spec.name])
                largest = self._max_shapes.get(spec.name)
                if largest is not None and any(a > b for a, b in zip(array.shape, largest, strict=True)):
                    raise InvalidInputError(
                        f"{self}: input {spec.name!r} of shape {list(array.shape)} is outside the engine's "
                        f"profile (at most {list(largest)}); rebuild the engine with a larger max batch"
                    )
                self._context.set_input_shape(spec.name, array.shape)
                cuda.memcpy_htod_async(self._buffers[spec.name], array, self._stream)
            if not self._context.execute_async_v3(self._stream.handle):
                raise BackendUnavailableError(f"{self}: TensorRT failed to run the engine")
            out = {}
            for spec in self.outputs:
                shape = tuple(self._context.get_tensor_shape(spec.name))
                host = np.empty(shape, spec.dtype)
                cuda.memcpy_dtoh_async(host, self._buffers[spec.name], self._stream)
                out[spec.name] = host
            self._stream.synchronize()
            return out

    def close(self) -> None:
        with self._lock:
            for buffer in self._buffers.values():
                buffer.free()
            self._buffers.clear()
            self._context = None
            self._engine = None
