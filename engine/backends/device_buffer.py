"""CUDA arrays across the backends' boundary: what a device input is (an address, a shape, a
device, its owner kept alive) and what a device output is (:class:`DeviceBuffer`: memory a
runtime filled, exposed through ``__cuda_array_interface__`` v3 so torch and CuPy read it in
place).

Nothing here touches CUDA itself: the addresses come from the arrays' own interfaces, so the
logic is tested on the CPU with stand-in arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from knnclip.engine.errors import BackendUnavailableError, InvalidInputError


@dataclass(frozen=True)
class DeviceInput:
    """A CUDA input as IO binding takes it: address, shape, device; ``keep`` holds its owner."""

    pointer: int
    shape: tuple[int, ...]
    device_id: int
    keep: Any


def cuda_array(value: Any, name: str) -> Any:
    """``value`` with ``__cuda_array_interface__``: as it is, or a DLPack-only array read through
    torch; anything else is refused."""
    if hasattr(value, "__cuda_array_interface__"):
        return value
    if not hasattr(value, "__dlpack__"):
        raise InvalidInputError(f"input {name!r}: a NumPy array or a CUDA array (CAI or DLPack), got {type(value)}")
    try:
        import torch
    except ImportError:
        raise BackendUnavailableError("a DLPack-only CUDA input needs torch to be read (pip install torch)") from None
    value = torch.from_dlpack(value)
    if not hasattr(value, "__cuda_array_interface__"):
        raise InvalidInputError(f"input {name!r} is not on a CUDA device")
    return value


def _synchronize_stream(stream: int) -> None:
    """Wait for the work queued on a producer's CUDA stream (a handle from CAI v3)."""
    try:
        import torch
    except ImportError:
        raise BackendUnavailableError(
            "an input written on a side stream needs torch to wait for that stream; synchronise it first"
        ) from None
    torch.cuda.ExternalStream(stream).synchronize()


def device_input(
    value: Any, name: str, dtype: np.dtype, synchronize: Callable[[int], None] = _synchronize_stream
) -> DeviceInput:
    """What ONNX Runtime's IO binding needs of a CUDA array: its address, shape and device.

    DLPack-only arrays are read through torch; a non-contiguous array is made contiguous
    by its own library (``.contiguous()``) or refused, never read with the wrong strides; a
    ``__cuda_array_interface__`` v3 stream is synchronised first, since ONNX Runtime runs on its
    own stream; the device comes from ``__dlpack_device__`` (or the array's ``device``)."""
    value = cuda_array(value, name)
    cai = value.__cuda_array_interface__
    shape = tuple(int(d) for d in cai["shape"])
    if np.dtype(cai["typestr"]) != dtype:
        raise InvalidInputError(f"input {name!r} is {np.dtype(cai['typestr'])}, the model takes {dtype}")
    strides = cai.get("strides")
    if strides is not None and tuple(strides) != _c_strides(shape, dtype.itemsize):
        if not hasattr(value, "contiguous"):
            raise InvalidInputError(f"input {name!r} is not contiguous: make it contiguous first")
        value = value.contiguous()
        cai = value.__cuda_array_interface__
    stream = cai.get("stream")
    if stream is not None and int(stream) > 2:  # 1 and 2 are the default streams
        synchronize(int(stream))
    if hasattr(value, "__dlpack_device__"):
        device_id = int(value.__dlpack_device__()[1])
    else:
        device = getattr(value, "device", None)
        device_id = int(getattr(device, "index", None) or getattr(device, "id", None) or 0)
    return DeviceInput(int(cai["data"][0]), shape, device_id, value)


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """C-order strides in bytes (an axis of length 1 can have any stride; CAI writes them anyway)."""
    out, step = [], itemsize
    for d in reversed(shape):
        out.append(step)
        step *= d
    return tuple(reversed(out))


class DeviceBuffer:
    """A model output left on the GPU: ``shape`` and ``dtype`` of C-contiguous memory at
    ``pointer`` on CUDA device ``device_id``, which ``owner`` (an ``OrtValue``, a pycuda
    allocation) keeps alive as long as this object or an array made from it lives.

    Ready to read when the session hands it over (the runtime's stream was synchronised), so its
    interface names no stream."""

    def __init__(self, pointer: int, shape: tuple[int, ...], dtype: np.dtype, device_id: int, owner: Any) -> None:
        self.pointer, self.shape, self.dtype = int(pointer), tuple(int(d) for d in shape), np.dtype(dtype)
        self.device_id, self.owner = int(device_id), owner

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        # An empty array's address may be 0; CAI wants it as 0 with read-only False.
        return {
            "shape": self.shape,
            "typestr": self.dtype.str,
            "data": (self.pointer, False),
            "version": 3,
            "strides": None,
            "stream": None,
        }

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, self.device_id)  # kDLCUDA

    def __repr__(self) -> str:
        return f"DeviceBuffer(shape={self.shape}, dtype={self.dtype}, cuda:{self.device_id})"
