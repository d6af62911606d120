"""The torch backend: the export side's PyTorch modules, eager, as the reference and the fallback.

It imports ``knnclip.export`` (where the model definitions live) when a session is opened, so
it needs the ``[export]`` extra. NumPy in, NumPy out on the CPU; on CUDA, :meth:`infer_device`
takes and returns torch tensors on the GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from knnclip.engine.artifact import Manifest
from knnclip.engine.backends.base import Session
from knnclip.engine.errors import BackendUnavailableError


class TorchSession(Session):
    backend = "torch"

    def __init__(self, directory: Path, manifest: Manifest, device: str = "cpu") -> None:
        super().__init__(directory, manifest, device)
        try:
            import torch

            from knnclip.export.modules import build_module
        except ImportError as exc:
            raise BackendUnavailableError(f"the torch backend needs torch ({exc}): pip install torch") from None
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError("device='cuda' asked for, but torch sees no CUDA device")
        self._torch = torch
        self._device = torch.device("cuda" if device == "cuda" else "cpu")
        self.module = build_module(directory, manifest).to(self._device)
        self._output_names = [spec.name for spec in self.outputs]

    def _forward(self, tensors: list[Any]) -> dict[str, Any]:
        with self._torch.inference_mode():
            out = self.module(*tensors)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return dict(zip(self._output_names, out, strict=True))

    def _run(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        tensors = [self._torch.from_numpy(np.ascontiguousarray(feed[s.name])).to(self._device) for s in self.inputs]
        return {k: v.cpu().numpy() for k, v in self._forward(tensors).items()}

    @property
    def device_outputs(self) -> bool:
        return self._device.type == "cuda"

    def infer_device(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        """Tensors (or anything DLPack exports) in, torch tensors on the session's device out."""
        self.validate(feed)
        tensors = [self._torch.as_tensor(feed[s.name], device=self._device) for s in self.inputs]
        return self._forward(tensors)

    def close(self) -> None:
        self.module = None  # type: ignore[assignment]  # closed: unusable from here on
