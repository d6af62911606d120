"""Reading FC-CLIP weights: the official checkpoint (detectron2 ``{"model": state_dict}`` or a bare
state dict) and open_clip ConvNeXt CLIP checkpoints for the CLIP parts alone, checked strictly."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from knnclip.engine.errors import CheckpointError
from knnclip.export.checkpoint_io import StateDict, check_state_dict, read_state_dict
from knnclip.export.fcclip.config import FCCLIPConfig, resolve_config
from knnclip.export.fcclip.model import FCCLIP, ClipModel

# Tensors an official checkpoint may carry that play no part at inference: the training loss's
# class weights, detectron2's normalisation buffers (the config holds them), open_clip's causal mask.
_TRAINING_ONLY = re.compile(r"^(criterion\.|pixel_mean$|pixel_std$|backbone\.clip_model\.attn_mask$)")
_CLIP_PREFIX = "backbone.clip_model."


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many numbered children ``prefix{i}.`` the state dict has (0 when none)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return 1 + max((int(m.group(1)) for k in sd if (m := pattern.match(k))), default=-1)


def describe_checkpoint(sd: Mapping[str, torch.Tensor]) -> str:
    """What architecture an FC-CLIP (or open_clip ConvNeXt) state dict looks like, for error messages."""
    prefix = _CLIP_PREFIX if any(k.startswith(_CLIP_PREFIX) for k in sd) else ""
    trunk = f"{prefix}visual.trunk.stages."
    try:
        depths = [_count(sd, f"{trunk}{i}.blocks.") for i in range(4)]
        dims = [int(sd[f"{trunk}{i}.blocks.0.conv_dw.weight"].shape[0]) for i in range(4)]
        text_width = int(sd[f"{prefix}token_embedding.weight"].shape[1])
        embed = int(sd[f"{prefix}text_projection"].shape[1])
    except (KeyError, IndexError):
        return "an unrecognised layout (not an FC-CLIP or open_clip ConvNeXt checkpoint?)"
    text_layers = _count(sd, f"{prefix}transformer.resblocks.")
    text = f"ConvNeXt depths={depths} dims={dims}, embed_dim={embed}, text width={text_width} layers={text_layers}"
    queries = sd.get("sem_seg_head.predictor.query_feat.weight")
    if queries is not None:
        layers = _count(sd, "sem_seg_head.predictor.transformer_ffn_layers.")
        text += f", {queries.shape[0]} queries, hidden {queries.shape[1]}, {layers} decoder layers"
    return text


def _drop_training_only(sd: Mapping[str, torch.Tensor]) -> StateDict:
    return {k: v for k, v in sd.items() if not _TRAINING_ONLY.match(k)}


def _read(checkpoint: str | os.PathLike[str] | Mapping[str, torch.Tensor]) -> tuple[StateDict, str]:
    if isinstance(checkpoint, Mapping):
        return dict(checkpoint), "state dict"
    return read_state_dict(Path(checkpoint)), str(checkpoint)


def _assign(model: torch.nn.Module, sd: StateDict, source: str) -> None:
    check_state_dict(model, sd, source, describe=describe_checkpoint)
    model.load_state_dict({k: v.to(torch.float32).contiguous() for k, v in sd.items()}, strict=True, assign=True)


def _config_beside(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``config.json`` beside a checkpoint file, if there is one."""
    beside = path.parent / "config.json"
    if not beside.is_file():
        return None
    try:
        values = json.loads(beside.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{beside}: not a JSON config ({exc}); pass config= explicitly") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{beside}: not a JSON object; pass config= explicitly")
    return values


def load_fcclip(
    checkpoint: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    config: FCCLIPConfig | dict[str, Any] | None = None,
) -> FCCLIP:
    """An FC-CLIP model in eval mode with the weights of ``checkpoint``, checked strictly.

    Parameters
    ----------
    checkpoint
        The official FC-CLIP checkpoint (``fcclip_cocopan.pth``: keys ``backbone.clip_model.*``,
        ``sem_seg_head.pixel_decoder.*``, ``sem_seg_head.predictor.*``, ``void_embedding.*``;
        detectron2's ``{"model": ...}`` wrapper is unwrapped), or such a state dict.
    config
        An :class:`FCCLIPConfig`, our own ``to_json`` dict, or the fixture-style ``config.json``
        (official detectron2/open_clip settings). ``None``: the ``config.json`` beside a checkpoint
        file when there is one, else ConvNeXt-Large d_320, 250 queries.

    Returns
    -------
    FCCLIP
        :meth:`FCCLIP.forward_image` runs the image part, :meth:`FCCLIP.clip` the text tower.
    """
    sd, source = _read(checkpoint)
    sd = _drop_training_only(sd)
    if config is None and not isinstance(checkpoint, Mapping):
        config = _config_beside(Path(checkpoint))
    # Built on the meta device: checking a ConvNeXt-L checkpoint allocates nothing, and the weights
    # are then assigned, not copied into freshly initialised parameters.
    with torch.device("meta"):
        model = FCCLIP(resolve_config(config))
    _assign(model, sd, source)
    return model.eval().requires_grad_(False)


def load_clip(
    checkpoint: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    config: FCCLIPConfig | dict[str, Any] | None = None,
) -> ClipModel:
    """The ConvNeXt CLIP model alone (image tower and text tower) from an open_clip checkpoint
    (``open_clip_pytorch_model.bin`` of ``laion/CLIP-convnext_large_d_320...``: keys ``visual.*``,
    ``transformer.*``, ``token_embedding.*``...) or from the CLIP part of an FC-CLIP checkpoint."""
    sd, source = _read(checkpoint)
    sd = _drop_training_only(sd)
    if any(k.startswith(_CLIP_PREFIX) for k in sd):
        sd = {k[len(_CLIP_PREFIX) :]: v for k, v in sd.items() if k.startswith(_CLIP_PREFIX)}
    sd.pop("attn_mask", None)
    with torch.device("meta"):
        model = ClipModel(resolve_config(config))
    _assign(model, sd, source)
    return model.eval().requires_grad_(False)
