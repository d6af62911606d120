"""A stand-in device for the CPU: arrays that live "on the device" and refuse every implicit trip
to the host, an array module over them that counts what crosses, and sessions whose outputs stay
there.

A :class:`DeviceArray` holds NumPy data it never hands out: ``np.asarray``, ``float()``,
``bool()``, iteration, ``tolist``, ``tobytes`` and arithmetic with a host array all raise
:class:`HostConversion`. The only ways across are :meth:`StandInArrays.upload` and
:meth:`StandInArrays.to_host`, which the pipeline calls with the kind of data they carry; the
computations themselves run NumPy's code on the wrapped data, so results on the host and on the
stand-in are comparable bit for bit.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import numpy as np

from knnclip.engine.pipeline.arrays import ArrayModule, NumpyArrays


class HostConversion(AssertionError):
    """A device array was read on the host outside ``to_host`` (an implicit copy)."""


def _refuse(what: str) -> HostConversion:
    return HostConversion(f"{what}: an implicit copy of a device array to the host")


def _operand(value: Any) -> Any:
    """A device array's data, or a Python/NumPy scalar; a host array is refused."""
    if isinstance(value, DeviceArray):
        return value.payload
    if isinstance(value, np.ndarray):
        raise HostConversion(f"a host array {value.shape} {value.dtype} mixed with a device array")
    if isinstance(value, (list, tuple)):
        return type(value)(_operand(v) for v in value)
    return value


def _index(key: Any) -> Any:
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, (slice, int, type(None), type(Ellipsis), np.integer)):
        return key
    return _operand(key)


def _wrap(value: Any) -> Any:
    if isinstance(value, np.ndarray) or np.isscalar(value) or isinstance(value, np.generic):
        return DeviceArray(np.asarray(value))
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    return value


class DeviceArray:
    """NumPy data that stays on the stand-in device (see the module's docstring)."""

    __array_ufunc__ = None  # NumPy's operators defer to this class, which refuses host arrays
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, data: np.ndarray) -> None:
        self.payload = data  # what the device holds: read by the stand-in's own module and sessions only

    shape = property(lambda self: self.payload.shape)
    dtype = property(lambda self: self.payload.dtype)
    ndim = property(lambda self: self.payload.ndim)

    def __len__(self) -> int:
        return len(self.payload)

    def __getitem__(self, key: Any) -> DeviceArray:
        return _wrap(self.payload[_index(key)])

    def __setitem__(self, key: Any, value: Any) -> None:
        self.payload[_index(key)] = _operand(value)

    def reshape(self, *shape: Any) -> DeviceArray:
        return DeviceArray(self.payload.reshape(*shape))

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype})"

    # Everything that would bring the data to the host.
    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise _refuse("__array__")

    def __bool__(self) -> bool:
        raise _refuse("bool()")

    def __float__(self) -> float:
        raise _refuse("float()")

    def __int__(self) -> int:
        raise _refuse("int()")

    def __index__(self) -> int:
        raise _refuse("operator.index()")

    def __iter__(self) -> Any:
        raise _refuse("iteration")

    def tolist(self) -> Any:
        raise _refuse("tolist()")

    def tobytes(self) -> bytes:
        raise _refuse("tobytes()")

    def item(self) -> Any:
        raise _refuse("item()")


def _binary(op: Any, reflected: bool = False) -> Any:
    def method(self: DeviceArray, other: Any) -> DeviceArray:
        a, b = (_operand(other), self.payload) if reflected else (self.payload, _operand(other))
        return DeviceArray(np.asarray(op(a, b)))

    return method


for _name in ("add", "sub", "mul", "truediv", "gt", "ge", "lt", "le", "eq", "ne", "and", "or", "matmul"):
    _op = getattr(operator, f"{_name}_" if _name in ("and", "or") else _name)
    setattr(DeviceArray, f"__{_name}__", _binary(_op))
    if _name in ("add", "sub", "mul", "truediv", "and", "or", "matmul"):
        setattr(DeviceArray, f"__r{_name}__", _binary(_op, reflected=True))
DeviceArray.__neg__ = lambda self: DeviceArray(-self.payload)  # type: ignore[method-assign]
DeviceArray.__invert__ = lambda self: DeviceArray(~self.payload)  # type: ignore[method-assign]


class StandInArrays(ArrayModule):
    """The pipeline's array module on the stand-in device: NumPy's code on the wrapped data."""

    name = "stand-in"
    device = "stand-in"
    on_host = False

    def __init__(self) -> None:
        super().__init__()
        self._numpy = NumpyArrays()

    def upload(self, host: np.ndarray, kind: str) -> DeviceArray:
        if not isinstance(host, np.ndarray):
            raise TypeError(f"upload takes a host NumPy array, got {type(host).__name__}")
        self.transfers.count("to_device", kind, host.nbytes)
        return DeviceArray(host.copy())

    def to_host(self, a: DeviceArray, kind: str) -> np.ndarray:
        if not isinstance(a, DeviceArray):
            raise TypeError(f"to_host takes a device array, got {type(a).__name__}")
        self.transfers.count("to_host", kind, a.payload.nbytes)
        return a.payload.copy()

    def adopt(self, output: Any) -> DeviceArray:
        if not isinstance(output, DeviceArray):
            raise HostConversion(f"a model output of type {type(output).__name__} is not on the device")
        return output


def _delegate(name: str) -> Any:
    def method(self: StandInArrays, *args: Any, **kwargs: Any) -> Any:
        host_args = [_operand(a) for a in args]
        host_kwargs = {k: _operand(v) for k, v in kwargs.items()}
        return _wrap(getattr(self._numpy, name)(*host_args, **host_kwargs))

    method.__name__ = name
    return method


for _name in (
    "empty",
    "zeros",
    "full",
    "astype",
    "contiguous",
    "concatenate",
    "transpose",
    "exp",
    "log",
    "where",
    "maximum",
    "norm",
    "matmul",
    "amax",
    "argmax",
    "take",
    "take_along",
    "sum",
    "any",
    "bincount",
    "topk",
    "softmax",
    "mask_pool",
    "retrieval_probs",
    "fuse",
    "resample",
    "semantic_argmax",
    "panoptic_owner",
):
    setattr(StandInArrays, _name, _delegate(_name))


class StandInSession:
    """A host session run "on the stand-in device": device arrays in, device arrays out."""

    def __init__(self, session: Any) -> None:
        self.session = session

    device_outputs = True

    def infer_device(self, feed: Mapping[str, Any]) -> dict[str, DeviceArray]:
        for name, value in feed.items():
            if not isinstance(value, DeviceArray):
                raise HostConversion(f"input {name!r} was not uploaded: {type(value).__name__}")
        outputs = self.session.infer({name: value.payload for name, value in feed.items()})
        return {name: DeviceArray(np.asarray(value)) for name, value in outputs.items()}

    def infer(self, feed: Mapping[str, Any]) -> Any:
        raise HostConversion("the device pipeline called a model's host path")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


class FakeCudaArray:
    """``__cuda_array_interface__`` v3 over a host buffer, on a chosen device."""

    def __init__(self, shape, dtype=np.float32, strides=None, stream=None, device=0):
        self.array = np.zeros(shape, dtype)
        self.shape, self.dtype = self.array.shape, self.array.dtype
        self._strides, self._stream, self._device = strides, stream, device

    @property
    def __cuda_array_interface__(self):
        return {
            "shape": self.shape,
            "typestr": self.dtype.str,
            "data": (self.array.ctypes.data, False),
            "strides": self._strides,
            "version": 3,
            "stream": self._stream,
        }

    def __dlpack_device__(self):
        return (2, self._device)
