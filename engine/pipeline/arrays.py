"""Where the pipeline's arrays live: one small namespace of array operations that the stages are
written against, with an implementation for host NumPy and one for torch tensors on any device.

The stages never call NumPy or torch directly on the data they pass along; they call the
:class:`ArrayModule` they were given (``xp``). On the host it is :data:`HOST` (NumPy and the CPU
kernels of :mod:`knnclip.engine.ops`); with ``device="cuda"`` it is :class:`TorchArrays` on that
device (torch and the CUDA kernels), so the model engines' outputs stay on the GPU until the
results leave it. Every copy between host and device goes through :meth:`ArrayModule.upload` or
:meth:`ArrayModule.to_host`, named by what it carries, and is counted in
:attr:`ArrayModule.transfers`: that is how a test proves that the only copies are the image in
and the results out, and how the benchmark reports the bytes moved per image.

What crosses, by name (:data:`TRANSFER_KINDS`):

- ``image``: the models' input tensors, in;
- ``constant``: per-vocabulary and per-image-size tables (the text classifier, the resize
  matrices), in, once: cached by key (:meth:`ArrayModule.constant`);
- ``segments``: per-query vectors for the host's bookkeeping of the segment table (a few bytes
  per query), both ways;
- ``result``: the label maps, instance masks and evidence, out;
- ``search``: the queries and their neighbours, where the database's index cannot be searched on
  the device (only flat indexes are; docs/architecture.md).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from knnclip.engine import ops

Array = Any  # np.ndarray on the host, a torch.Tensor (or a test's stand-in) on a device

TRANSFER_KINDS = ("image", "constant", "segments", "result", "search")


@dataclass
class Transfers:
    """Bytes and copies between host and device, per direction and kind (thread-safe)."""

    to_device: dict[str, int] = field(default_factory=dict)
    to_host: dict[str, int] = field(default_factory=dict)
    copies: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, direction: str, kind: str, nbytes: int) -> None:
        if kind not in TRANSFER_KINDS:
            raise ValueError(f"transfer kind must be one of {TRANSFER_KINDS}, got {kind!r}")
        with self._lock:
            table = self.to_device if direction == "to_device" else self.to_host
            table[kind] = table.get(kind, 0) + int(nbytes)
            self.copies += 1

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {"to_device": dict(self.to_device), "to_host": dict(self.to_host)}

    def since(self, before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        """The bytes moved since ``before`` (a :meth:`snapshot`), kinds with none left out."""
        now = self.snapshot()
        moved = {d: {k: v - before[d].get(k, 0) for k, v in table.items()} for d, table in now.items()}
        return {d: {k: v for k, v in table.items() if v} for d, table in moved.items()}


class ArrayModule:
    """The operations the pipeline needs, on one kind of array (see the module's docstring).

    Subclasses implement every method; dtypes are named by NumPy's strings (``"float32"``).
    Arithmetic and indexing use the arrays' own operators, which NumPy and torch share."""

    name = "?"
    device = "cpu"
    on_host = False

    def __init__(self, constants: int = 64) -> None:
        self.transfers = Transfers()
        self._constants: OrderedDict[Hashable, Array] = OrderedDict()
        self._constants_size = constants
        self._constants_lock = threading.Lock()

    # Host <-> device --------------------------------------------------------------------------
    def upload(self, host: np.ndarray, kind: str) -> Array:
        """``host`` on this module's device (counted under ``kind``)."""
        raise NotImplementedError

    def to_host(self, a: Array, kind: str) -> np.ndarray:
        """``a`` as a host NumPy array (counted under ``kind``)."""
        raise NotImplementedError

    def adopt(self, output: Any) -> Array:
        """A model's output as this module's array, without a copy (``Session.infer_device``'s
        outputs on a device; NumPy arrays on the host)."""
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait for the work queued on this module's device (a no-op on the host)."""

    def out_of_memory(self, exc: BaseException) -> bool:
        """Whether ``exc`` is this module's device running out of memory."""
        return isinstance(exc, MemoryError)

    def constant(self, key: Hashable, make: Callable[[], np.ndarray]) -> Array:
        """The device copy of ``make()``, made and uploaded once per ``key`` (least recently used
        dropped past the cache's size)."""
        with self._constants_lock:
            if key in self._constants:
                self._constants.move_to_end(key)
                return self._constants[key]
        value = self.upload(np.ascontiguousarray(make()), "constant")
        with self._constants_lock:
            self._constants[key] = value
            while len(self._constants) > self._constants_size:
                self._constants.popitem(last=False)
        return value

    # Creation and layout ----------------------------------------------------------------------
    def empty(self, shape: Sequence[int], dtype: str) -> Array:
        raise NotImplementedError

    def zeros(self, shape: Sequence[int], dtype: str) -> Array:
        raise NotImplementedError

    def full(self, shape: Sequence[int], value: float, dtype: str) -> Array:
        raise NotImplementedError

    def astype(self, a: Array, dtype: str) -> Array:
        raise NotImplementedError

    def contiguous(self, a: Array) -> Array:
        raise NotImplementedError

    def concatenate(self, arrays: Sequence[Array], axis: int = 0) -> Array:
        raise NotImplementedError

    def transpose(self, a: Array) -> Array:
        """The last two axes swapped (a view where the module has views)."""
        raise NotImplementedError

    # Maths --------------------------------------------------------------------------------------
    def exp(self, a: Array) -> Array:
        raise NotImplementedError

    def log(self, a: Array) -> Array:
        raise NotImplementedError

    def where(self, condition: Array, a: Array | float, b: Array | float) -> Array:
        raise NotImplementedError

    def maximum(self, a: Array, b: float) -> Array:
        raise NotImplementedError

    def norm(self, a: Array, axis: int = -1) -> Array:
        """The L2 norm over ``axis``, kept as an axis of size 1."""
        raise NotImplementedError

    def matmul(self, a: Array, b: Array) -> Array:
        raise NotImplementedError

    def amax(self, a: Array, axis: int, keepdims: bool = False) -> Array:
        raise NotImplementedError

    def argmax(self, a: Array, axis: int = -1) -> Array:
        """int64 indices of the first maximum along ``axis``."""
        raise NotImplementedError

    def take(self, a: Array, index: Array, axis: int = 0) -> Array:
        raise NotImplementedError

    def take_along(self, a: Array, index: Array, axis: int = -1) -> Array:
        raise NotImplementedError

    def sum(self, a: Array, axis: int | tuple[int, ...], keepdims: bool = False) -> Array:
        raise NotImplementedError

    def any(self, a: Array, axis: int) -> Array:
        raise NotImplementedError

    def bincount(self, x: Array, minlength: int, weights: Array | None = None) -> Array:
        raise NotImplementedError

    def topk(self, a: Array, k: int) -> tuple[Array, Array]:
        """The ``k`` largest values of a 1-D or 2-D (per row) array and their int64 indices, in
        descending order; which of equal values make the cut is not specified."""
        raise NotImplementedError

    def softmax(self, x: Array, axis: int = -1) -> Array:
        e = self.exp(x - self.amax(x, axis=axis, keepdims=True))
        return e / self.sum(e, axis=axis, keepdims=True)

    # The compiled ops ---------------------------------------------------------------------------
    def mask_pool(self, features: Array, masks: Array, threshold: float) -> Array:
        raise NotImplementedError

    def retrieval_probs(self, sims: Array, labels: Array, num_classes: int, tau: float) -> Array:
        raise NotImplementedError

    def fuse(self, p_base: Array, p_ret: Array, threshold: float, lam: float) -> Array:
        raise NotImplementedError

    def resample(self, x: Array, rows: Array, cols: Array) -> Array:
        raise NotImplementedError

    def semantic_argmax(self, class_probs: Array, masks: Array) -> Array:
        raise NotImplementedError

    def panoptic_owner(self, scores: Array, masks: Array, queries: Array) -> tuple[Array, Array, Array]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.device})"


class NumpyArrays(ArrayModule):
    """Host NumPy arrays and the CPU kernels: transfers are no-ops (and count nothing)."""

    name = "numpy"
    device = "cpu"
    on_host = True

    def upload(self, host: np.ndarray, kind: str) -> np.ndarray:
        return host

    def to_host(self, a: np.ndarray, kind: str) -> np.ndarray:
        return np.asarray(a)

    def adopt(self, output: Any) -> np.ndarray:
        return np.asarray(output)

    def constant(self, key: Hashable, make: Callable[[], np.ndarray]) -> np.ndarray:
        return make()  # nothing to upload: no cache (whose entries would only keep old arrays alive)

    def empty(self, shape: Sequence[int], dtype: str) -> np.ndarray:
        return np.empty(tuple(shape), dtype)

    def zeros(self, shape: Sequence[int], dtype: str) -> np.ndarray:
        return np.zeros(tuple(shape), dtype)

    def full(self, shape: Sequence[int], value: float, dtype: str) -> np.ndarray:
        return np.full(tuple(shape), value, dtype)

    def astype(self, a: np.ndarray, dtype: str) -> np.ndarray:
        return a.astype(dtype, copy=False)

    def contiguous(self, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a)

    def concatenate(self, arrays: Sequence[np.ndarray], axis: int = 0) -> np.ndarray:
        return np.concatenate(list(arrays), axis=axis)

    def transpose(self, a: np.ndarray) -> np.ndarray:
        return np.swapaxes(a, -1, -2)

    def exp(self, a: np.ndarray) -> np.ndarray:
        return np.exp(a)

    def log(self, a: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):  # log(0) is -inf, as in torch
            return np.log(a)

    def where(self, condition: np.ndarray, a: Any, b: Any) -> np.ndarray:
        return np.where(condition, a, b)

    def maximum(self, a: np.ndarray, b: float) -> np.ndarray:
        return np.maximum(a, b)

    def norm(self, a: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.linalg.norm(a, axis=axis, keepdims=True)

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a @ b

    def amax(self, a: np.ndarray, axis: int, keepdims: bool = False) -> np.ndarray:
        return a.max(axis=axis, keepdims=keepdims)

    def argmax(self, a: np.ndarray, axis: int = -1) -> np.ndarray:
        return a.argmax(axis=axis).astype(np.int64, copy=False)

    def take(self, a: np.ndarray, index: np.ndarray, axis: int = 0) -> np.ndarray:
        return np.take(a, index, axis=axis)

    def take_along(self, a: np.ndarray, index: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.take_along_axis(a, index, axis=axis)

    def sum(self, a: np.ndarray, axis: int | tuple[int, ...], keepdims: bool = False) -> np.ndarray:
        return a.sum(axis=axis, keepdims=keepdims)

    def any(self, a: np.ndarray, axis: int) -> np.ndarray:
        return np.asarray(a.any(axis=axis))

    def bincount(self, x: np.ndarray, minlength: int, weights: np.ndarray | None = None) -> np.ndarray:
        return np.bincount(x.ravel(), weights=None if weights is None else weights.ravel(), minlength=minlength)

    def topk(self, a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = a.shape[-1]
        top = np.argpartition(-a, k - 1, axis=-1)[..., :k] if k < n else np.broadcast_to(np.arange(n), a.shape).copy()
        values = np.take_along_axis(a, top, axis=-1)
        order = np.argsort(-values, axis=-1, kind="stable")
        return np.take_along_axis(values, order, axis=-1), np.take_along_axis(top, order, axis=-1).astype(np.int64)

    def mask_pool(self, features: np.ndarray, masks: np.ndarray, threshold: float) -> np.ndarray:
        return ops.mask_pool(features, masks, threshold)

    def retrieval_probs(self, sims: np.ndarray, labels: np.ndarray, num_classes: int, tau: float) -> np.ndarray:
        return ops.retrieval_probs(sims, labels, num_classes, tau)

    def fuse(self, p_base: np.ndarray, p_ret: np.ndarray, threshold: float, lam: float) -> np.ndarray:
        return ops.fuse(p_base, p_ret, threshold, lam)

    def resample(self, x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return ops.resample(x, rows, cols)

    def semantic_argmax(self, class_probs: np.ndarray, masks: np.ndarray) -> np.ndarray:
        return ops.semantic_argmax(class_probs, masks)

    def panoptic_owner(
        self, scores: np.ndarray, masks: np.ndarray, queries: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return ops.panoptic_owner(scores, masks, queries)


HOST = NumpyArrays()


class TorchArrays(ArrayModule):
    """torch tensors on ``device`` ("cuda", "cuda:1", or "cpu" for tests) and the compiled ops:
    the CUDA kernels for CUDA tensors (their results come back zero-copy through DLPack), the
    CPU kernels for CPU tensors (through zero-copy NumPy views).

    The compiled ops read torch's tensors through DLPack with ``stream=`` their own stream, so torch
    orders the work it has queued on its current stream before the kernels read (docs/ops.md)."""

    name = "torch"

    def __init__(self, device: str = "cuda", constants: int = 64) -> None:
        super().__init__(constants)
        import torch

        self._torch = torch
        self.device = str(torch.device(device))
        self._dev = torch.device(device)
        self._cuda = self._dev.type == "cuda"
        if self._cuda and not ops.build_info()["cuda"]:
            from knnclip.engine.errors import BackendUnavailableError

            raise BackendUnavailableError(
                "the device pipeline needs knnclip._C built with its CUDA kernels (build_info()['cuda'] is "
                "False); reinstall on the GPU machine (docs/backends.md), or run with device='cpu'"
            )
        self._dtypes = {
            "float32": torch.float32,
            "float64": torch.float64,
            "float16": torch.float16,
            "int32": torch.int32,
            "int64": torch.int64,
            "bool": torch.bool,
            "uint8": torch.uint8,
        }

    def _dtype(self, name: str) -> Any:
        return self._dtypes[str(np.dtype(name))]

    def upload(self, host: np.ndarray, kind: str) -> Any:
        self.transfers.count("to_device", kind, host.nbytes)
        t = self._torch.from_numpy(np.ascontiguousarray(host))
        return t.to(self._dev, non_blocking=False) if self._cuda else t.clone()

    def to_host(self, a: Any, kind: str) -> np.ndarray:
        self.transfers.count("to_host", kind, a.element_size() * a.numel())
        return a.detach().cpu().numpy() if self._cuda else a.detach().numpy().copy()

    def adopt(self, output: Any) -> Any:
        torch = self._torch
        if isinstance(output, np.ndarray):
            if self._cuda:  # a session whose outputs came back to the host: infer_device's contract broken
                raise ValueError(f"a model output on the host given to the pipeline on {self._dev}")
            return torch.from_numpy(output)
        if not isinstance(output, torch.Tensor):
            # __cuda_array_interface__ (TensorRT's and ONNX Runtime's buffers) or DLPack
            has_cai = hasattr(output, "__cuda_array_interface__")
            output = torch.as_tensor(output, device=self._dev) if has_cai else torch.from_dlpack(output)
        if output.device != self._dev:
            raise ValueError(f"a model output on {output.device} given to the pipeline on {self._dev}")
        return output

    def synchronize(self) -> None:
        if self._cuda:
            self._torch.cuda.synchronize(self._dev)

    def out_of_memory(self, exc: BaseException) -> bool:
        oom = getattr(self._torch.cuda, "OutOfMemoryError", ())
        return isinstance(exc, MemoryError) or (bool(oom) and isinstance(exc, oom))

    def empty(self, shape: Sequence[int], dtype: str) -> Any:
        return self._torch.empty(tuple(shape), dtype=self._dtype(dtype), device=self._dev)

    def zeros(self, shape: Sequence[int], dtype: str) -> Any:
        return self._torch.zeros(tuple(shape), dtype=self._dtype(dtype), device=self._dev)

    def full(self, shape: Sequence[int], value: float, dtype: str) -> Any:
        return self._torch.full(tuple(shape), value, dtype=self._dtype(dtype), device=self._dev)

    def astype(self, a: Any, dtype: str) -> Any:
        return a.to(self._dtype(dtype))

    def contiguous(self, a: Any) -> Any:
        return a.contiguous()

    def concatenate(self, arrays: Sequence[Any], axis: int = 0) -> Any:
        return self._torch.cat(list(arrays), dim=axis)

    def transpose(self, a: Any) -> Any:
        return a.transpose(-1, -2)

    def exp(self, a: Any) -> Any:
        return self._torch.exp(a)

    def log(self, a: Any) -> Any:
        return self._torch.log(a)

    def where(self, condition: Any, a: Any, b: Any) -> Any:
        return self._torch.where(condition, a, b)

    def maximum(self, a: Any, b: float) -> Any:
        return self._torch.clamp_min(a, b)

    def norm(self, a: Any, axis: int = -1) -> Any:
        return self._torch.linalg.vector_norm(a, dim=axis, keepdim=True)

    def matmul(self, a: Any, b: Any) -> Any:
        return a @ b

    def amax(self, a: Any, axis: int, keepdims: bool = False) -> Any:
        return self._torch.amax(a, dim=axis, keepdim=keepdims)

    def argmax(self, a: Any, axis: int = -1) -> Any:
        # torch.argmax's tie-break is not documented; the first maximum is what NumPy gives
        best = self._torch.amax(a, dim=axis, keepdim=True)
        n = a.shape[axis]
        positions = self._torch.arange(n, device=a.device).reshape([-1] + [1] * (a.ndim - 1 - (axis % a.ndim)))
        return self._torch.where(a == best, positions, n).amin(dim=axis)

    def take(self, a: Any, index: Any, axis: int = 0) -> Any:
        if not isinstance(index, self._torch.Tensor):
            index = self._torch.as_tensor(index, device=a.device)
        return self._torch.index_select(a, axis, index.reshape(-1)).reshape(
            *a.shape[: axis % a.ndim], *index.shape, *a.shape[axis % a.ndim + 1 :]
        )

    def take_along(self, a: Any, index: Any, axis: int = -1) -> Any:
        return self._torch.take_along_dim(a, index, dim=axis)

    def sum(self, a: Any, axis: int | tuple[int, ...], keepdims: bool = False) -> Any:
        return a.sum(dim=axis, keepdim=keepdims)

    def any(self, a: Any, axis: int) -> Any:
        return a.any(dim=axis)

    def bincount(self, x: Any, minlength: int, weights: Any | None = None) -> Any:
        w = None if weights is None else weights.reshape(-1).to(self._torch.float64)
        return self._torch.bincount(x.reshape(-1), weights=w, minlength=minlength)

    def topk(self, a: Any, k: int) -> tuple[Any, Any]:
        return self._torch.topk(a, k, dim=-1, largest=True, sorted=True)

    # The compiled ops: NumPy views of CPU tensors, DLPack both ways for CUDA tensors.
    def _op(self, op: Callable[..., Any], *arrays: Any, **kwargs: Any) -> Any:
        if self._cuda:
            out = op(*arrays, **kwargs)
            return tuple(map(self._torch.from_dlpack, out)) if isinstance(out, tuple) else self._torch.from_dlpack(out)
        out = op(*(a.numpy() if isinstance(a, self._torch.Tensor) else a for a in arrays), **kwargs)
        return tuple(map(self._torch.from_numpy, out)) if isinstance(out, tuple) else self._torch.from_numpy(out)

    def mask_pool(self, features: Any, masks: Any, threshold: float) -> Any:
        return self._op(ops.mask_pool, features.contiguous(), masks.contiguous(), threshold)

    def retrieval_probs(self, sims: Any, labels: Any, num_classes: int, tau: float) -> Any:
        return self._op(ops.retrieval_probs, sims.contiguous(), labels.contiguous(), num_classes, tau)

    def fuse(self, p_base: Any, p_ret: Any, threshold: float, lam: float) -> Any:
        return self._op(ops.fuse, p_base.contiguous(), p_ret.contiguous(), threshold, lam)

    def resample(self, x: Any, rows: Any, cols: Any) -> Any:
        return self._op(ops.resample, x.contiguous(), rows.contiguous(), cols.contiguous())

    def semantic_argmax(self, class_probs: Any, masks: Any) -> Any:
        return self._op(ops.semantic_argmax, class_probs.contiguous(), masks.contiguous())

    def panoptic_owner(self, scores: Any, masks: Any, queries: Any) -> tuple[Any, Any, Any]:
        owner, own, pixels = self._op(ops.panoptic_owner, scores.contiguous(), masks.contiguous(), queries.contiguous())
        return owner, own.to(self._torch.bool), pixels
