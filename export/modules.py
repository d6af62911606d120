"""Rebuild the torch module behind an exported artefact from its manifest and ``weights.pt``,
for the torch backend (``knnclip.engine.backends.torch``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch

from knnclip.engine.artifact import KIND_DINOV2, KIND_FCCLIP_IMAGE, KIND_FCCLIP_TEXT, MANIFEST_NAME, Manifest
from knnclip.engine.errors import ArtifactCorruptError, BackendUnavailableError
from knnclip.engine.fsutil import confined


def build_module(directory: Path, manifest: Manifest) -> torch.nn.Module:
    """The fp32 module of artefact ``directory`` (kind ``dinov2-keys``, ``fcclip-image`` or
    ``fcclip-text``) in eval mode, with its saved weights loaded strictly."""
    record = manifest.files.get("torch_weights")
    if record is None:
        raise BackendUnavailableError(
            f"{directory}: this artefact has no torch weights; re-export it with torch weights "
            "(--torch-weights) to run it on the torch backend, or use onnxruntime"
        )
    kind = manifest.kind
    config = manifest.model.get("config")
    if not isinstance(config, dict):
        raise ArtifactCorruptError(directory / MANIFEST_NAME, "the manifest's 'model' has no 'config'; re-export it")
    with torch.device("meta"):
        if kind == KIND_DINOV2:
            from knnclip.export.dinov2 import DinoV2
            from knnclip.export.dinov2 import resolve_config as dinov2_config

            module: torch.nn.Module = DinoV2(dinov2_config(config))
        elif kind in (KIND_FCCLIP_IMAGE, KIND_FCCLIP_TEXT):
            from knnclip.export.fcclip import FCCLIP
            from knnclip.export.fcclip import resolve_config as fcclip_config
            from knnclip.export.fcclip.onnx import ImageGraph, TextGraph

            model = FCCLIP(fcclip_config(config))
            # artefacts exported before the dense map left the run-time graph still list it
            dense = any(o.name == "clip_dense" for o in manifest.outputs)
            module = ImageGraph(model, dense=dense) if kind == KIND_FCCLIP_IMAGE else TextGraph(model.clip)
        else:
            raise ArtifactCorruptError(directory, f"no torch module for artefact kind {kind!r}")
    try:
        path = confined(directory, record.name, "weights file")
    except ValueError as exc:
        raise ArtifactCorruptError(directory / MANIFEST_NAME, str(exc)) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        module.load_state_dict(state, strict=True, assign=True)
    except Exception as exc:  # noqa: BLE001 - torch raises pickle, zip, runtime and key errors alike for a bad file
        raise ArtifactCorruptError(
            path, f"torch weights do not load ({type(exc).__name__}: {exc}); re-export the artefact"
        ) from None
    if kind == KIND_DINOV2 and manifest.input_size is not None:
        cast(Any, module).fix_input_size(*manifest.input_size)  # a DinoV2
    return module.eval().requires_grad_(False)
