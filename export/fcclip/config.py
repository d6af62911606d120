"""FC-CLIP hyper-parameters: one dataclass per part, the official ConvNeXt-Large defaults, and a
reader for the fixture-style ``config.json`` (the official detectron2 + open_clip settings)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from knnclip.engine.errors import InvalidInputError


@dataclass(frozen=True)
class ClipConfig:
    """open_clip ConvNeXt CLIP: the timm trunk, the MLP projection head and the text tower."""

    depths: tuple[int, ...] = (3, 3, 27, 3)
    dims: tuple[int, ...] = (192, 384, 768, 1536)
    embed_dim: int = 768
    text_width: int = 768
    text_layers: int = 16  # convnext_large_d_320: the "_d" models have a 16-layer text tower
    text_heads: int = 12
    context_length: int = 77
    vocab_size: int = 49408

    @property
    def head_hidden(self) -> int:
        return 2 * self.embed_dim  # open_clip TimmModel proj="mlp": Mlp(C, 2E, E)


@dataclass(frozen=True)
class PixelDecoderConfig:
    """MSDeformAttnPixelDecoder: deformable encoder over res3..res5, FPN down to stride 4."""

    conv_dim: int = 256
    mask_dim: int = 256
    encoder_layers: int = 6
    encoder_heads: int = 8
    encoder_points: int = 4
    encoder_ffn_dim: int = 1024  # hard-coded in the official from_config
    num_groups: int = 32  # GroupNorm(32, conv_dim)
    common_stride: int = 4


@dataclass(frozen=True)
class DecoderConfig:
    """FC-CLIP's MultiScaleMaskedTransformerDecoder. ``layers`` counts transformer layers
    (detectron2's DEC_LAYERS minus one)."""

    hidden_dim: int = 256
    heads: int = 8
    ffn_dim: int = 2048
    layers: int = 9
    num_queries: int = 250
    num_feature_levels: int = 3


@dataclass(frozen=True)
class InferenceConfig:
    pixel_mean: tuple[float, float, float] = (122.7709383, 116.7460125, 104.09373615)
    pixel_std: tuple[float, float, float] = (68.5005327, 66.6321579, 70.32316305)
    size_divisibility: int = 32
    alpha: float = 0.4  # geometric ensemble weight of the CLIP branch for classes seen in training
    beta: float = 0.8  # ... and for unseen classes
    object_mask_threshold: float = 0.0
    overlap_threshold: float = 0.8
    min_size_test: int = 800
    max_size_test: int = 1333


@dataclass(frozen=True)
class FCCLIPConfig:
    clip: ClipConfig = field(default_factory=ClipConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def __post_init__(self) -> None:
        c, p, d = self.clip, self.pixel_decoder, self.decoder
        problems = []
        if len(c.depths) != 4 or len(c.dims) != 4:
            problems.append(f"the ConvNeXt trunk has 4 stages: depths {c.depths}, dims {c.dims}")
        if p.conv_dim % p.num_groups:
            problems.append(
                f"pixel decoder conv_dim {p.conv_dim} is not divisible by GroupNorm's {p.num_groups} groups"
            )
        if p.conv_dim % p.encoder_heads or d.hidden_dim % d.heads or c.text_width % c.text_heads:
            problems.append("every attention width must be divisible by its number of heads")
        if d.hidden_dim != p.conv_dim:
            problems.append(
                f"decoder hidden_dim {d.hidden_dim} differs from the pixel decoder conv_dim {p.conv_dim} "
                "(the decoder's input projections for that case are not implemented)"
            )
        if problems:
            raise InvalidInputError("invalid FC-CLIP config: " + "; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_from_dict(values: dict[str, Any]) -> FCCLIPConfig:
    """From our own ``to_json`` form or the fixture-style official settings (``clip.trunk.depths``,
    ``pixel_decoder.conv_dim``, ``transformer_decoder.num_transformer_layers``, ``meta_arch``...)."""
    if not isinstance(values, dict):
        raise InvalidInputError(f"an FC-CLIP config must be a dict, got {type(values).__name__}")
    if "transformer_decoder" not in values and "meta_arch" not in values:
        try:
            return FCCLIPConfig(
                clip=ClipConfig(**_tuples(values.get("clip", {}))),
                pixel_decoder=PixelDecoderConfig(**values.get("pixel_decoder", {})),
                decoder=DecoderConfig(**values.get("decoder", {})),
                inference=InferenceConfig(**_tuples(values.get("inference", {}))),
            )
        except TypeError as exc:
            raise InvalidInputError(f"FC-CLIP config: {exc}") from None
    try:
        clip, trunk, text = values["clip"], values["clip"]["trunk"], values["clip"]["text"]
        pd, td, meta = values["pixel_decoder"], values["transformer_decoder"], values.get("meta_arch", {})
        clip_cfg = ClipConfig(
            depths=tuple(trunk["depths"]),
            dims=tuple(trunk["dims"]),
            embed_dim=int(clip["embed_dim"]),
            text_width=int(text["width"]),
            text_layers=int(text["layers"]),
            text_heads=int(text["heads"]),
            context_length=int(text.get("context_length", 77)),
            vocab_size=int(text.get("vocab_size", 49408)),
        )
        if len(pd.get("transformer_in_features", ["res3", "res4", "res5"])) != 3:
            raise InvalidInputError(
                "only the official three deformable-encoder levels (res3, res4, res5) are supported"
            )
        pd_cfg = PixelDecoderConfig(
            conv_dim=int(pd["conv_dim"]),
            mask_dim=int(pd["mask_dim"]),
            encoder_layers=int(pd["encoder_layers"]),
            encoder_heads=int(pd["encoder_heads"]),
            encoder_points=int(pd.get("encoder_points", 4)),
            encoder_ffn_dim=int(pd.get("encoder_ffn_dim", 1024)),
            common_stride=int(pd.get("common_stride", 4)),
        )
        if td.get("pre_norm", False):
            raise InvalidInputError("pre_norm decoders are not supported (FC-CLIP uses post-norm)")
        layers = td.get("num_transformer_layers", int(td.get("cfg_dec_layers", 10)) - 1)
        dec_cfg = DecoderConfig(
            hidden_dim=int(td["hidden_dim"]),
            heads=int(td["nheads"]),
            ffn_dim=int(td["dim_feedforward"]),
            layers=int(layers),
            num_queries=int(td["num_queries"]),
        )
        inf: dict[str, Any] = {}
        for ours, theirs in (
            ("pixel_mean", "pixel_mean"),
            ("pixel_std", "pixel_std"),
            ("size_divisibility", "size_divisibility"),
            ("alpha", "geometric_ensemble_alpha"),
            ("beta", "geometric_ensemble_beta"),
            ("object_mask_threshold", "object_mask_threshold"),
            ("overlap_threshold", "overlap_threshold"),
        ):
            if theirs in meta:
                inf[ours] = tuple(meta[theirs]) if isinstance(meta[theirs], list) else meta[theirs]
        resize = (values.get("preprocessing") or {}).get("test_time_resize") or {}
        for key in ("min_size_test", "max_size_test"):
            if key in resize:
                inf[key] = int(resize[key])
        return FCCLIPConfig(clip=clip_cfg, pixel_decoder=pd_cfg, decoder=dec_cfg, inference=InferenceConfig(**inf))
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, InvalidInputError):
            raise
        raise InvalidInputError(f"FC-CLIP config: missing or malformed field {exc}") from None


def _tuples(values: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def resolve_config(config: FCCLIPConfig | dict[str, Any] | None) -> FCCLIPConfig:
    if config is None:
        return FCCLIPConfig()
    if isinstance(config, FCCLIPConfig):
        return config
    return config_from_dict(config)
