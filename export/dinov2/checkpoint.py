"""Reading DINOv2 weights: the official hub checkpoints and the Hugging Face layout, checked
strictly against the model the config describes."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from knnclip.engine.errors import CheckpointError
from knnclip.export.checkpoint_io import StateDict, check_state_dict, read_state_dict, strip_prefix
from knnclip.export.dinov2.config import DinoV2Config, resolve_config
from knnclip.export.dinov2.model import DinoV2


def is_hf_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("embeddings.", "dinov2.embeddings.")) for k in sd)


_HF_BLOCK = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "mlp.weights_in.weight": "mlp.w12.weight",
    "mlp.weights_in.bias": "mlp.w12.bias",
    "mlp.weights_out.weight": "mlp.w3.weight",
    "mlp.weights_out.bias": "mlp.w3.bias",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_QKV = re.compile(r"^attention\.attention\.(query|key|value)\.(weight|bias)$")


def hf_to_official(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename a Hugging Face ``Dinov2Model``/``Dinov2WithRegistersModel`` state dict to the official
    names; the separate query/key/value projections are stacked into ``attn.qkv`` (q, k, v order).
    Names that match no rule are kept as they are, so the strict check reports them."""
    sd = strip_prefix(dict(sd), ("dinov2.",))
    out: StateDict = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in sd.items():
        if name in _HF_TOP:
            out[_HF_TOP[name]] = tensor
            continue
        layer = _HF_LAYER.match(name)
        if layer is None:
            out[name] = tensor
            continue
        index, rest = int(layer.group(1)), layer.group(2)
        part = _HF_QKV.match(rest)
        if part is not None:
            qkv.setdefault((index, part.group(2)), {})[part.group(1)] = tensor
        elif rest in _HF_BLOCK:
            out[f"blocks.{index}.{_HF_BLOCK[rest]}"] = tensor
        else:
            out[name] = tensor
    for (index, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            missing = sorted({"query", "key", "value"} - set(parts))
            raise CheckpointError(
                f"layer {index}: attention {kind} lacks {missing} (incomplete Hugging Face checkpoint)"
            )
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    # Hugging Face keeps the mask token as [1, D]; so does the official code.
    return out


_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.(.+)$")


def unchunk_blocks(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Official checkpoints saved with ``block_chunks > 0`` name blocks ``blocks.{chunk}.{i}.*``
    (``i`` global): rename to ``blocks.{i}.*``."""
    if not any(_CHUNKED_BLOCK.match(k) for k in sd):
        return dict(sd)
    return {(_CHUNKED_BLOCK.sub(r"blocks.\1.\2", k)): v for k, v in sd.items()}


def describe_checkpoint(sd: Mapping[str, torch.Tensor]) -> str:
    """What architecture a (official-layout) state dict looks like, for error messages."""
    try:
        dim = sd["cls_token"].shape[-1]
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k)))
        registers = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
        ffn = "swiglu" if any(".mlp.w12." in k for k in sd) else "mlp"
        patch = sd["patch_embed.proj.weight"].shape[-1]
        grid = round((sd["pos_embed"].shape[1] - 1) ** 0.5)
    except (KeyError, ValueError, IndexError):
        return "an unrecognised layout (not a DINOv2 checkpoint?)"
    return (
        f"embed_dim={dim}, depth={depth}, ffn_layer={ffn}, num_register_tokens={registers}, "
        f"patch_size={patch}, img_size={grid * patch}"
    )


def _hf_config(path: Path) -> dict[str, Any] | None:
    config = (path if path.is_dir() else path.parent) / "config.json"
    if not config.is_file():
        return None
    try:
        values = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError):
        return None
    return values if isinstance(values, dict) and "hidden_size" in values else None


def load_dinov2(
    checkpoint: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    config: DinoV2Config | dict[str, Any] | str | None = None,
) -> DinoV2:
    """A DINOv2 model in eval mode with the weights of ``checkpoint``, checked strictly.

    Parameters
    ----------
    checkpoint
        An official hub checkpoint (``dinov2_vitg14_reg4_pretrain.pth`` layout), a Hugging Face
        ``Dinov2``/``Dinov2WithRegisters`` ``.safetensors`` file or model directory, an ``hf://ORG/NAME``
        repository (downloaded with huggingface_hub), or a state dict.
    config
        A :class:`DinoV2Config`, a dict of official constructor arguments (or a Hugging Face config),
        a preset name (``"vits14"`` ... ``"vitg14_reg4"``) or a JSON file. ``None`` means the
        Hugging Face ``config.json`` beside the weights when there is one, else ViT-g/14-reg4 at 518.

    Returns
    -------
    DinoV2
        ``model(images[B, 3, H, W]) -> keys[B, D, H/14, W/14]``.
    """
    source = "state dict"
    if isinstance(checkpoint, Mapping):
        sd = dict(checkpoint)
    else:
        location = checkpoint
        if isinstance(checkpoint, str) and checkpoint.startswith("hf://"):
            from knnclip.export.dinov2.hub import download_dinov2

            location = download_dinov2(checkpoint[len("hf://") :])
        path = Path(location)
        source = str(path)
        sd = strip_prefix(read_state_dict(path), ("backbone.",))  # DINOv2 training saves: teacher.backbone.*
        if config is None:
            config = _hf_config(path)
    if is_hf_layout(sd):
        sd = hf_to_official(sd)
    sd = unchunk_blocks(sd)
    # Built on the meta device: checking a ViT-g checkpoint allocates nothing, and the weights are
    # then assigned, not copied into freshly initialised parameters.
    with torch.device("meta"):
        model = DinoV2(resolve_config(config))
    check_state_dict(model, sd, source, describe=describe_checkpoint)
    model.load_state_dict({k: v.to(torch.float32).contiguous() for k, v in sd.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)
