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
    """float32 result of a CUDA op; zero-copy into torch/CuPy via __cuda_array_interface__ or DLPack.

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
    def numpy(self) -> npt.NDArray[np.float32]: ...

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
def semantic_argmax(
    class_probs: npt.NDArray[Any], mask_logits: npt.NDArray[Any], *, check: bool = True
) -> npt.NDArray[np.int32]: ...
def resample(
    x: npt.NDArray[Any], rows: npt.NDArray[np.float32], cols: npt.NDArray[np.float32], *, check: bool = True
) -> npt.NDArray[np.float32]: ...
def panoptic_owner(
    scores: npt.NDArray[np.float32],
    mask_logits: npt.NDArray[Any],
    queries: npt.NDArray[np.int64],
    *,
    check: bool = True,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.bool_], npt.NDArray[np.int64]]: ...
def crc32c(data: Any, value: int = 0, *, implementation: str = "auto") -> int:
    """CRC-32C (Castagnoli) of a C-contiguous buffer; pass the previous result as `value` to extend it."""

def crc32c_implementation() -> str: ...
def f16_to_f32(src: npt.NDArray[np.float16], out: npt.NDArray[np.float32]) -> None:
    """Convert a C-contiguous float16 array into a float32 array of the same size (exact)."""
