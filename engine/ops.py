"""The compiled ops of knnclip._C, checked against the installed package and re-exported.

Every op takes NumPy arrays (CPU kernels, float32 or float16 in, float32 out) or CUDA arrays that
expose ``__cuda_array_interface__`` or DLPack (CUDA kernels; the result is a
:class:`knnclip._C.DeviceArray` on the same device, zero-copy into torch or CuPy).

Examples
--------
>>> import numpy as np
>>> from knnclip.engine import ops
>>> features = np.ones((4, 2, 2), np.float32)          # [C, H, W]
>>> masks = np.array([[[1.0, -1.0], [-1.0, -1.0]]], np.float32)  # [N, h, w] logits
>>> ops.mask_pool(features, masks).tolist()
[[1.0, 1.0, 1.0, 1.0]]
>>> sims = np.array([[0.9, 0.8, 0.1]], np.float32)
>>> labels = np.array([[2, 2, -1]], np.int64)         # -1: no neighbour
>>> ops.retrieval_probs(sims, labels, num_classes=3, tau=0.1).round(3).tolist()
[[0.0, 0.0, 1.0]]
"""

from __future__ import annotations

from knnclip.engine.errors import BuildMismatchError
from knnclip.engine.version import __version__

try:
    from knnclip import _C
except ImportError as exc:  # pragma: no cover - depends on how the package was installed
    raise BuildMismatchError(
        f"knnclip._C could not be imported ({exc}); reinstall knnclip with "
        "`pip install .` from the source tree so the compiled ops are built"
    ) from exc

_built = _C.build_info()["version"]
if _built != __version__:  # pragma: no cover - only with a stale build on the path
    raise BuildMismatchError(
        f"knnclip._C was built for version {_built} but the Python package is {__version__}; "
        "rebuild with `pip install .`"
    )

DeviceArray = getattr(_C, "DeviceArray", None)
build_info = _C.build_info
cuda_available = _C.cuda_available
cuda_status = _C.cuda_status
cpu_isa = _C.cpu_isa
supported_cpu_isas = _C.supported_cpu_isas
set_cpu_isa = _C.set_cpu_isa
mask_pool = _C.mask_pool
retrieval_probs = _C.retrieval_probs
fuse = _C.fuse
semantic_merge = _C.semantic_merge
semantic_argmax = _C.semantic_argmax
resample = _C.resample
panoptic_owner = _C.panoptic_owner

__all__ = [
    "DeviceArray",
    "build_info",
    "cpu_isa",
    "cuda_available",
    "cuda_status",
    "fuse",
    "mask_pool",
    "panoptic_owner",
    "resample",
    "retrieval_probs",
    "semantic_argmax",
    "semantic_merge",
    "set_cpu_isa",
    "supported_cpu_isas",
]
