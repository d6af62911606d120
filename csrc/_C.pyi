"""Type stub of the compiled module knnclip._C (hand-written; see csrc/bindings.cpp)."""

from typing import Any, TypedDict

import numpy as np
import numpy.typing as npt

class BuildInfo(TypedDict):
    version: str
    cuda: bool
    cuda_archs: list[str]
    cuda_runtime: str | None
    openmp: bool
    threads: int
    cpu_isas: list[str]
    cpu_isa: str
    compiler: str

class DeviceArray:
    """Result of a CUDA op (float32; int32, bool or int64 labels and counts); zero-copy into
    torch/CuPy via __cuda_array_interface__ or DLPack.

    The memory returns to the stream-ordered pool, on the ops' stream, when the last reference
    (this object or an array made from it) goes: a consumer's work on another stream that reads
    it must have finished by then (docs/ops.md)."""

    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> str: ...
    @property
    def device(self) -> int: ...
    @property
    def __cuda_array_interface__(self) -> dict[str, Any]: ...
    def __dlpack__(self, **kwargs: Any) -> Any: ...
    def __dlpack_device__(self) -> tuple[int, int]: ...
    def numpy(self) -> npt.NDArray[Any]: ...

# NumPy arrays go to the CPU kernels; CUDA arrays (__cuda_array_interface__ or DLPack) to the
# CUDA kernels, which return a DeviceArray.
Array = Any

def build_info() -> BuildInfo: ...
def cuda_available() -> bool: ...
def cuda_status() -> str: ...
def cpu_isa() -> str: ...
def supported_cpu_isas() -> list[str]: ...
def set_cpu_isa(name: str) -> None: ...
def mask_pool(features: Array, mask_logits: Array, threshold: float = 0.0, *, check: bool = True) -> Array: ...
def retrieval_probs(sims: Array, labels: Array, num_classes: int, tau: float) -> Array: ...
def fuse(p_base: Array, p_ret: Array, T: float, lam: float, *, check: bool = True) -> Array: ...
def semantic_merge(class_probs: Array, mask_logits: Array, *, check: bool = True) -> Array: ...
def semantic_argmax(class_probs: Array, mask_logits: Array, *, check: bool = True) -> Array: ...
def resample(x: Array, rows: Array, cols: Array, *, check: bool = True) -> Array: ...
def panoptic_owner(
    scores: Array, mask_logits: Array, queries: Array, *, check: bool = True
) -> tuple[Array, Array, Array]: ...

class device_bodies:
    @staticmethod
    def resample(
        x: npt.NDArray[np.float32], rows: npt.NDArray[np.float32], cols: npt.NDArray[np.float32]
    ) -> npt.NDArray[np.float32]: ...
    @staticmethod
    def semantic_argmax(
        class_probs: npt.NDArray[np.float32], mask_logits: npt.NDArray[np.float32]
    ) -> npt.NDArray[np.int32]: ...
    @staticmethod
    def panoptic_owner(
        scores: npt.NDArray[np.float32], mask_logits: npt.NDArray[np.float32], queries: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.bool_], npt.NDArray[np.int64]]: ...
    @staticmethod
    def retrieval_probs(
        sims: npt.NDArray[np.float32], labels: npt.NDArray[np.int64], num_classes: int, tau: float
    ) -> npt.NDArray[np.float32]: ...
    @staticmethod
    def fuse(
        p_base: npt.NDArray[np.float32], p_ret: npt.NDArray[np.float32], T: float, lam: float
    ) -> npt.NDArray[np.float32]: ...
    @staticmethod
    def binarize(
        mask_logits: npt.NDArray[np.float32], height: int, width: int, threshold: float = 0.0
    ) -> npt.NDArray[np.bool_]: ...

def input_protocol(array: Any) -> str:
    """How the ops read `array`: 'numpy', 'cuda_array_interface', 'dlpack' or 'none'."""

def crc32c(data: Any, value: int = 0, *, implementation: str = "auto") -> int:
    """CRC-32C (Castagnoli) of a C-contiguous buffer; pass the previous result as `value` to extend it."""

def crc32c_implementation() -> str: ...
def f16_to_f32(src: npt.NDArray[np.float16], out: npt.NDArray[np.float32]) -> None:
    """Convert a C-contiguous float16 array into a float32 array of the same size (exact)."""
