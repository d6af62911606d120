"""Mixed fp16 compute for export: the heavy layers (exact ``nn.Linear`` and ``nn.Conv2d``) hold fp16
weights and compute in fp16 with casts at their edges; everything else (LayerNorm, GroupNorm,
softmax, attention written with ``F.linear``, residual streams) stays fp32, since their sums
overflow or lose too much in fp16. The traced graph then has Cast nodes around each such layer,
which ONNX Runtime and TensorRT fuse away."""

from __future__ import annotations

import copy
import types

from torch import Tensor, nn


def _half_forward(module: nn.Module, x: Tensor) -> Tensor:
    return type(module).forward(module, x.half()).float()


def half_compute_copy(model: nn.Module, within: tuple[str, ...] = ("",)) -> nn.Module:
    """A deep copy of ``model`` whose linear and conv layers under the named submodules ``within``
    (all of them by default) compute in fp16. The original is untouched: it stays the fp32
    reference the export is verified against."""
    clone = copy.deepcopy(model)
    for name, module in clone.named_modules():
        if not any(name.startswith(prefix) for prefix in within):
            continue
        if type(module) in (nn.Linear, nn.Conv2d):
            module.half()
            module.forward = types.MethodType(_half_forward, module)
    return clone
