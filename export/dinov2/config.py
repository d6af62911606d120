"""DINOv2 vision transformer hyper-parameters: one dataclass, the official presets, and readers
for the official constructor arguments and the Hugging Face ``config.json``."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knnclip.engine.errors import InvalidInputError

FFN_LAYERS = ("mlp", "swiglu")


@dataclass(frozen=True)
class DinoV2Config:
    """Everything that fixes the computation of a DINOv2 ViT.

    The defaults are ViT-g/14 with 4 registers at 518x518, the model kNN-CLIP uses.
    ``ffn_layer="swiglu"`` is the official ``swiglufused``/``swiglu`` (both build the same fused
    SwiGLU whose hidden width is rounded to 2/3 of ``mlp_ratio * embed_dim``, up to a multiple of 8).
    ``init_values=None`` means no LayerScale. Position embeddings for other input sizes are
    resized as the official code does: bicubic, to ``size`` when ``interpolate_offset`` is 0,
    else by ``scale_factor=(n + offset) / M``.
    """

    embed_dim: int = 1536
    depth: int = 40
    num_heads: int = 24
    mlp_ratio: float = 4.0
    ffn_layer: str = "swiglu"
    num_register_tokens: int = 4
    patch_size: int = 14
    img_size: int = 518
    in_chans: int = 3
    init_values: float | None = 1.0
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    interpolate_antialias: bool = True
    interpolate_offset: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        for name in ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "in_chans"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_register_tokens < 0:
            problems.append(f"num_register_tokens must be >= 0, got {self.num_register_tokens}")
        if isinstance(self.embed_dim, int) and isinstance(self.num_heads, int) and self.num_heads > 0:
            if self.embed_dim % self.num_heads:
                problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.ffn_layer not in FFN_LAYERS:
            problems.append(
                f"ffn_layer must be one of {FFN_LAYERS} (or the official 'swiglufused'), got {self.ffn_layer!r}"
            )
        if not self.mlp_ratio > 0:
            problems.append(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if isinstance(self.img_size, int) and isinstance(self.patch_size, int) and self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if problems:
            raise InvalidInputError("invalid DINOv2 config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def grid_size(self) -> int:
        """Side of the square patch grid the position embedding was trained for (37 at 518/14)."""
        return self.img_size // self.patch_size

    @property
    def ffn_hidden(self) -> int:
        hidden = int(self.embed_dim * self.mlp_ratio)
        if self.ffn_layer == "swiglu":
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        arch = _ARCH_NAMES.get(
            (self.embed_dim, self.depth, self.num_heads), f"ViT(D={self.embed_dim}, depth={self.depth})"
        )
        regs = f"-reg{self.num_register_tokens}" if self.num_register_tokens else ""
        return f"{arch}/{self.patch_size}{regs}"


_ARCH_NAMES = {(384, 12, 6): "ViT-S", (768, 12, 12): "ViT-B", (1024, 24, 16): "ViT-L", (1536, 40, 24): "ViT-g"}
_ARCHS: dict[str, dict[str, Any]] = {
    "vits14": dict(embed_dim=384, depth=12, num_heads=6, ffn_layer="mlp"),
    "vitb14": dict(embed_dim=768, depth=12, num_heads=12, ffn_layer="mlp"),
    "vitl14": dict(embed_dim=1024, depth=24, num_heads=16, ffn_layer="mlp"),
    "vitg14": dict(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglu"),
}
# The hub entries: without registers the position embedding is resized with the historical
# +0.1 offset and no antialiasing; the register models switched to antialiased resizing to size.
_NO_REGISTERS: dict[str, Any] = dict(num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1)
_REGISTERS: dict[str, Any] = dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)

PRESETS: dict[str, DinoV2Config] = {}
for _name, _arch in _ARCHS.items():
    PRESETS[_name] = DinoV2Config(**_arch, **_NO_REGISTERS)
    PRESETS[f"{_name}_reg4"] = DinoV2Config(**_arch, **_REGISTERS)
DEFAULT_PRESET = "vitg14_reg4"

# Official DinoVisionTransformer constructor arguments that change nothing at inference, or whose
# only supported value is the default (act_layer GELU, norm LayerNorm eps 1e-6, PatchEmbed).
_IGNORED_OFFICIAL = {
    "drop_path_rate",
    "drop_path_uniform",
    "block_chunks",
    "embed_layer",
    "act_layer",
    "block_fn",
    "pretrained",
    "weights",
    "note",
    "arch_name",
}
_OFFICIAL_FFN = {"mlp": "mlp", "swiglu": "swiglu", "swiglufused": "swiglu"}
_ARCH_NAME_PRESET = {"vit_small": "vits14", "vit_base": "vitb14", "vit_large": "vitl14", "vit_giant2": "vitg14"}


def config_from_dict(values: dict[str, Any]) -> DinoV2Config:
    """A config from the official ``DinoVisionTransformer`` arguments, our own field names, or a
    Hugging Face ``Dinov2Config``/``Dinov2WithRegistersConfig`` dictionary.

    Official arguments that do not change the computation are ignored; unknown keys are ignored
    with a warning. Arguments left out take the official constructor's defaults (ViT-B-like
    ``embed_dim=768, depth=12``, MLP FFN, no registers, offset 0.1), so a dict written for the
    official constructor means the same thing here.
    """
    if not isinstance(values, dict):
        raise InvalidInputError(f"a DINOv2 config must be a dict / JSON object, got {type(values).__name__}")
    if "hidden_size" in values or str(values.get("model_type", "")).startswith("dinov2"):
        return _config_from_hf(values)
    fields = {f.name for f in dataclasses.fields(DinoV2Config)}
    base: dict[str, Any] = dict(
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        ffn_layer="mlp",
        num_register_tokens=0,
        patch_size=16,
        img_size=224,
        init_values=None,
        interpolate_antialias=False,
        interpolate_offset=0.1,
    )  # DinoVisionTransformer.__init__ defaults
    arch = values.get("arch_name")
    if arch is not None:
        if arch not in _ARCH_NAME_PRESET:
            raise InvalidInputError(f"unknown arch_name {arch!r}; known: {sorted(_ARCH_NAME_PRESET)}")
        base.update(_ARCHS[_ARCH_NAME_PRESET[arch]], patch_size=14, img_size=518, init_values=1.0)
    unknown = []
    for key, value in values.items():
        if key in _IGNORED_OFFICIAL:
            continue
        if key not in fields:
            unknown.append(key)
            continue
        if key == "ffn_layer":
            if value not in _OFFICIAL_FFN:
                raise InvalidInputError(f"ffn_layer {value!r} is not supported; use one of {sorted(_OFFICIAL_FFN)}")
            value = _OFFICIAL_FFN[value]
        if key == "init_values" and not value:
            value = None  # the official code builds LayerScale only when init_values is truthy
        base[key] = value
    if unknown:
        warnings.warn(f"DINOv2 config: ignoring unknown keys {sorted(unknown)}", stacklevel=2)
    return DinoV2Config(**base)


def _config_from_hf(values: dict[str, Any]) -> DinoV2Config:
    if values.get("hidden_act", "gelu") != "gelu" or float(values.get("layer_norm_eps", 1e-6)) != 1e-6:
        raise InvalidInputError("only hidden_act='gelu' and layer_norm_eps=1e-6 (the DINOv2 checkpoints) are supported")
    registers = int(values.get("num_register_tokens", 0))
    resize = _REGISTERS if registers else _NO_REGISTERS
    return DinoV2Config(
        embed_dim=int(values.get("hidden_size", 768)),
        depth=int(values.get("num_hidden_layers", 12)),
        num_heads=int(values.get("num_attention_heads", 12)),
        mlp_ratio=float(values.get("mlp_ratio", 4)),
        ffn_layer="swiglu" if values.get("use_swiglu_ffn", False) else "mlp",
        num_register_tokens=registers,
        patch_size=int(values.get("patch_size", 14)),
        img_size=int(values.get("image_size", 518)),
        in_chans=int(values.get("num_channels", 3)),
        init_values=float(values.get("layerscale_value", 1.0)),
        qkv_bias=bool(values.get("qkv_bias", True)),
        interpolate_antialias=bool(resize["interpolate_antialias"]),
        interpolate_offset=float(resize["interpolate_offset"]),
    )


def resolve_config(config: DinoV2Config | dict[str, Any] | str | os.PathLike[str] | None) -> DinoV2Config:
    """A ``DinoV2Config`` from a config, a dict, a preset name (``"vits14"``, ``"vitg14_reg4"``, ...),
    a path to a JSON file, or None (ViT-g/14-reg4 at 518)."""
    if config is None:
        return PRESETS[DEFAULT_PRESET]
    if isinstance(config, DinoV2Config):
        return config
    if isinstance(config, dict):
        return config_from_dict(config)
    if isinstance(config, str) and config in PRESETS:
        return PRESETS[config]
    if isinstance(config, str) and config.lstrip().startswith("{"):
        try:
            values = json.loads(config)
        except ValueError as exc:
            raise InvalidInputError(f"config is not valid JSON ({exc})") from None
        return config_from_dict(values)
    if isinstance(config, str | os.PathLike) and Path(config).is_file():
        try:
            values = json.loads(Path(config).read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInputError(f"{config}: not a JSON config ({exc})") from None
        return config_from_dict(values)
    raise InvalidInputError(
        f"config {config!r} is neither a preset ({', '.join(PRESETS)}), a JSON file, nor a JSON object"
    )
