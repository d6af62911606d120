"""The TensorRT backend: an engine for this GPU from the engine cache (built on first use when
the export side is installed), run with ``execute_async_v3`` on its own CUDA stream.

Buffers: pycuda (cuda-python would do as well), in the device's primary context (shared with
torch and ONNX Runtime, pushed around every call, so any thread can call). Each call sets the
input shapes, reads the output shapes TensorRT resolves from them, and (re)allocates a tensor's
device buffer only when it needs more than the last one held; host copies go through page-locked
staging buffers, grown the same way; every TensorRT call that can fail is checked.

Thread safety: one execution context and one set of buffers per session, guarded by a lock, so
concurrent ``infer`` calls run one after another; open one session per thread for parallel work.

Not yet run on a GPU (TensorRT cannot be installed where this was written); its tests skip.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from knnclip.engine.artifact import Manifest
from knnclip.engine.backends.base import Session
from knnclip.engine.backends.device_buffer import DeviceBuffer, cuda_array, device_input
from knnclip.engine.backends.tensorrt.cache import EngineCache
from knnclip.engine.errors import ArtifactCorruptError, BackendUnavailableError, InvalidInputError


def open_tensorrt(directory: Path, manifest: Manifest, device: str) -> TensorRTSession:
    if device != "cuda":
        raise BackendUnavailableError("TensorRT runs on CUDA devices only")
    try:
        from knnclip.engine.backends.tensorrt.builder import build_engine, engine_key, import_tensorrt, settings_for
    except ImportError as exc:
        raise BackendUnavailableError(f"the TensorRT backend needs the export side ({exc})") from None
    trt = import_tensorrt()
    cache = EngineCache()
    settings = settings_for(cache.root, manifest)  # what `knnclip build` used, so its engine is found
    key = engine_key(manifest, settings, trt.__version__)
    plan = cache.get_or_build(key, lambda: build_engine(directory, settings), {"onnx_dir": str(directory)})
    return TensorRTSession(directory, manifest, plan)


class TensorRTSession(Session):
    backend = "tensorrt"

    def __init__(self, directory: Path, manifest: Manifest, plan: bytes) -> None:
        super().__init__(directory, manifest, "cuda")
        import pycuda.driver as cuda
        import tensorrt as trt

        self._cuda = cuda
        # The device's primary context, shared with torch and ONNX Runtime (pycuda.autoinit would
        # make a private one, current on the importing thread only); pushed around every call.
        cuda.init()
        self._device_id = 0
        self._ctx = cuda.Device(self._device_id).retain_primary_context()
        self._ctx.push()
        try:
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(plan)
            if self._engine is None:
                raise ArtifactCorruptError(
                    directory,
                    "TensorRT could not deserialise the cached engine (another TensorRT version or "
                    "GPU?); delete ~/.cache/knnclip/engines or run `knnclip build` again",
                )
            self._context = self._engine.create_execution_context()
            # Non-blocking (CU_STREAM_NON_BLOCKING = 1): not serialised with the legacy default
            # stream, which other libraries' work (and the compiled ops') may be queued on.
            self._stream = cuda.Stream(flags=1)
        finally:
            self._ctx.pop()
        self._lock = threading.Lock()
        self._outputs = OutputPool(cuda.mem_alloc)  # infer_device's outputs, reused once let go of
        self._buffers: dict[str, Any] = {}  # device buffers, grown to the largest size a call needed
        self._capacity: dict[str, int] = {}
        self._pinned: dict[str, np.ndarray] = {}  # page-locked host staging, per tensor
        self._profiles: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # input -> (min, max)
        self._dtypes: dict[str, np.dtype] = {}
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            self._dtypes[name] = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                smallest, _, largest = self._engine.get_tensor_profile_shape(name, 0)
                self._profiles[name] = (tuple(smallest), tuple(largest))

    def _buffer(self, name: str, nbytes: int) -> int:
        """The device address of ``name``'s buffer, (re)allocated when ``nbytes`` do not fit. Output
        sizes come from the context once the input shapes are set: an engine with dynamic axes
        (batch, or an image graph's height and width) has no fixed output size to allocate once."""
        if self._capacity.get(name, -1) < nbytes:
            old = self._buffers.pop(name, None)
            if old is not None:
                old.free()
            self._buffers[name] = self._cuda.mem_alloc(max(nbytes, 1))
            self._capacity[name] = nbytes
        address = int(self._buffers[name])
        if not self._context.set_tensor_address(name, address):
            raise BackendUnavailableError(f"{self}: TensorRT refused the address of tensor {name!r}")
        return address

    def _staging(self, name: str, nbytes: int) -> np.ndarray:
        """A page-locked host buffer of at least ``nbytes`` for ``name`` (grown when needed): copies
        from pageable memory are staged by the driver synchronously, from pinned memory they are
        asynchronous DMA on the session's stream."""
        buffer = self._pinned.get(name)
        if buffer is None or buffer.nbytes < nbytes:
            buffer = self._pinned[name] = self._cuda.pagelocked_empty(max(nbytes, 1), np.uint8)
        return buffer[:nbytes]

    def _set_input(self, name: str, value: Any) -> Any:
        """Give TensorRT ``value``'s shape and address: a host array is staged and copied into the
        session's buffer on its stream, a CUDA array is read in place. Returns what must stay alive
        until the run is done."""
        shape = tuple(int(d) for d in value.shape)
        smallest, largest = self._profiles[name]
        if any(a < lo or a > hi for a, lo, hi in zip(shape, smallest, largest, strict=True)):
            raise InvalidInputError(
                f"{self}: input {name!r} of shape {list(shape)} is outside the engine's "
                f"profile ({list(smallest)} to {list(largest)}); rebuild the engine for it"
            )
        if not self._context.set_input_shape(name, shape):
            raise InvalidInputError(f"{self}: TensorRT refused the shape {list(shape)} of {name!r}")
        if not isinstance(value, np.ndarray):
            item = device_input(value, name, self._dtypes[name])
            if not self._context.set_tensor_address(name, item.pointer):
                raise BackendUnavailableError(f"{self}: TensorRT refused the address of tensor {name!r}")
            return item.keep
        array = np.ascontiguousarray(value)
        self._buffer(name, array.nbytes)
        staged = self._staging(name, array.nbytes)
        staged[:] = array.reshape(-1).view(np.uint8)
        self._cuda.memcpy_htod_async(self._buffers[name], staged, self._stream)
        return array

    def _output_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for spec in self.outputs:
            shape = tuple(int(d) for d in self._context.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise BackendUnavailableError(f"{self}: TensorRT left the shape of {spec.name!r} unresolved")
            shapes[spec.name] = shape
        return shapes

    def _execute(self) -> None:
        if not self._context.execute_async_v3(self._stream.handle):
            raise BackendUnavailableError(f"{self}: TensorRT failed to run the engine")

    @property
    def device_outputs(self) -> bool:
        return True

    def infer_device(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        """Inputs on the GPU (read in place) or on the host (copied in), outputs left on the GPU:
        each in a buffer of its own (:class:`DeviceBuffer`, leased from :class:`OutputPool`), so the
        next call cannot overwrite what the caller holds. The producer of a CUDA input must have
        finished writing it, and work that reads an output must have finished when the last
        reference to it goes (the pipeline synchronises its stream before each model call)."""
        feed = {name: v if isinstance(v, np.ndarray) else cuda_array(v, name) for name, v in feed.items()}
        self.validate(feed)
        with self._current():
            kept = [self._set_input(spec.name, feed[spec.name]) for spec in self.inputs]
            outputs = {}
            for name, shape in self._output_shapes().items():
                dtype = self._dtypes[name]
                lease = self._outputs.lease(int(np.prod(shape)) * dtype.itemsize)
                if not self._context.set_tensor_address(name, lease.address):
                    raise BackendUnavailableError(f"{self}: TensorRT refused the address of tensor {name!r}")
                outputs[name] = DeviceBuffer(lease.address, shape, dtype, self._device_id, lease)
            self._execute()
            self._stream.synchronize()  # the outputs are ready, and the inputs no longer read
            del kept
            return outputs

    def _run(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        cuda = self._cuda
        with self._current():
            kept = [self._set_input(spec.name, feed[spec.name]) for spec in self.inputs]
            shapes = self._output_shapes()
            for name, shape in shapes.items():
                self._buffer(name, int(np.prod(shape)) * self._dtypes[name].itemsize)
            self._execute()
            staged_out = {}
            for spec in self.outputs:
                nbytes = int(np.prod(shapes[spec.name])) * self._dtypes[spec.name].itemsize
                staged_out[spec.name] = self._staging(spec.name, nbytes)
                cuda.memcpy_dtoh_async(staged_out[spec.name], self._buffers[spec.name], self._stream)
            self._stream.synchronize()
            del kept  # the inputs are no longer read
            # Copied out of the staging buffers, which the next call reuses.
            return {
                name: staged.view(self._dtypes[name]).reshape(shapes[name]).copy()
                for name, staged in staged_out.items()
            }

    @contextmanager
    def _current(self) -> Iterator[None]:
        """This session's lock held and its CUDA context current (refused once closed)."""
        with self._lock:
            if self._ctx is None:
                raise BackendUnavailableError(f"{self} is closed")
            self._ctx.push()
            try:
                yield
            finally:
                self._ctx.pop()

    def close(self) -> None:
        """Free the device buffers and TensorRT's objects under this session's context (freeing
        device memory needs the context that owns it current), then release the context."""
        with self._lock:
            if self._ctx is None:
                return
            self._ctx.push()
            try:
                self._stream.synchronize()  # nothing may still be reading the buffers
                for buffer in self._buffers.values():
                    buffer.free()
                self._buffers.clear()
                self._outputs.close()  # the spare outputs; leased ones are freed when let go of
                self._capacity.clear()
                self._pinned.clear()
                self._context = self._engine = self._runtime = self._stream = None
            finally:
                self._ctx.pop()
                self._ctx.detach()  # the retained primary context
                self._ctx = None


class OutputLease:
    """One output allocation lent to a caller; it returns to its pool when this object goes."""

    def __init__(self, allocation: Any) -> None:
        self.allocation = allocation
        self.address = int(allocation)


class OutputPool:
    """Device allocations for ``infer_device``'s outputs, reused: an output the caller let go of
    comes back here (a finaliser on its lease) and the next call of that size takes it, instead
    of a cudaMalloc per output per call and a cudaFree, which synchronises the device. At most
    :attr:`KEEP` spares are kept per size; the others are dropped (pycuda frees them)."""

    KEEP = 4

    def __init__(self, allocate: Any) -> None:
        self._allocate = allocate
        # Its own lock: a finaliser may run in any thread, also one inside the session's lock.
        self._lock = threading.Lock()
        self._spare: dict[int, list[Any]] = {}
        self._closed = False

    def lease(self, nbytes: int) -> OutputLease:
        nbytes = max(int(nbytes), 1)
        with self._lock:
            spare = self._spare.get(nbytes)
            allocation = spare.pop() if spare else None
        lease = OutputLease(allocation if allocation is not None else self._allocate(nbytes))
        weakref.finalize(lease, self._give_back, nbytes, lease.allocation)
        return lease

    def _give_back(self, nbytes: int, allocation: Any) -> None:
        with self._lock:
            spare = self._spare.setdefault(nbytes, [])
            if not self._closed and len(spare) < self.KEEP:
                spare.append(allocation)

    def close(self) -> None:
        """Free the spares (the caller has the allocations' context current); later returns are dropped."""
        with self._lock:
            self._closed = True
            spares = [a for allocations in self._spare.values() for a in allocations]
            self._spare.clear()
        for allocation in spares:
            allocation.free()
