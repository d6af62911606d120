"""Reading checkpoints and checking them strictly against a model (shared by the model loaders)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from knnclip.engine.errors import CheckpointError
from knnclip.export.safetensors import load_safetensors

StateDict = dict[str, torch.Tensor]

_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WRAPPER_KEYS = ("model", "state_dict", "teacher", "module")


def read_state_dict(path: str | os.PathLike[str]) -> StateDict:
    """The tensors of a ``.pth``/``.pt``/``.bin`` (torch) or ``.safetensors`` file, or of a Hugging Face
    model directory. Checkpoints that wrap the weights (``{"model": ...}``, ``{"teacher": ...}``,
    DDP's ``module.`` prefix) are unwrapped."""
    path = Path(path)
    if path.is_dir():
        for name in _HF_WEIGHT_FILES:
            if (path / name).is_file():
                return read_state_dict(path / name)
        raise CheckpointError(f"{path}: a directory without {' or '.join(_HF_WEIGHT_FILES)}")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises pickle, zip and runtime errors alike for a bad file
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None
    for _ in range(3):
        if isinstance(obj, Mapping) and not _is_tensor_dict(obj):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not _is_tensor_dict(obj):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors")
    return strip_prefix(dict(obj), ("module.",))


def _is_tensor_dict(obj: Mapping[Any, Any]) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def strip_prefix(sd: StateDict, prefixes: tuple[str, ...]) -> StateDict:
    for prefix in prefixes:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def check_state_dict(
    model: torch.nn.Module,
    sd: Mapping[str, torch.Tensor],
    source: str = "checkpoint",
    describe: Callable[[Mapping[str, torch.Tensor]], str] | None = None,
) -> None:
    """Raise ``CheckpointError`` listing every missing, unexpected and mis-shaped tensor, and any
    tensor with NaN or Inf values."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(sd) & set(expected)
        if tuple(sd[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or misshaped:
        config = getattr(model, "config", None)
        name = config.describe() if config is not None and hasattr(config, "describe") else type(model).__name__
        parts = [f"{source} does not match the model {name} ({config})"]
        for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if names:
                shown = ", ".join(names[:12]) + (f", ... ({len(names) - 12} more)" if len(names) > 12 else "")
                parts.append(f"{len(names)} {label}: {shown}")
        if describe is not None:
            parts.append(f"the checkpoint looks like {describe(sd)}; pass the matching config")
        raise CheckpointError("\n  ".join(parts))
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source}: NaN or Inf values in {', '.join(sorted(bad)[:12])}")
