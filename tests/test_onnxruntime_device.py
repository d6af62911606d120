"""ONNX Runtime's device inputs, on the CPU with stand-in CUDA arrays: the address, shape and
device IO binding gets, strides honoured or refused, a producer's stream synchronised first."""

from __future__ import annotations

import numpy as np
import pytest

from knnclip.engine.backends.onnxruntime import device_input
from knnclip.engine.errors import InvalidInputError


class FakeCudaArray:
    """``__cuda_array_interface__`` v3 over a host buffer, on a chosen device."""

    def __init__(self, shape, dtype=np.float32, strides=None, stream=None, device=0):
        self.array = np.zeros(shape, dtype)
        self.shape, self.dtype = self.array.shape, self.array.dtype
        self._strides, self._stream, self._device = strides, stream, device

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.array.ctypes.data, False),
                "strides": self._strides, "version": 3, "stream": self._stream}  # fmt: skip

    def __dlpack_device__(self):
        return (2, self._device)


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
