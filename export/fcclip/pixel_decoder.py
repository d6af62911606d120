"""Mask2Former's MSDeformAttnPixelDecoder as FC-CLIP configures it: a deformable-attention
encoder over res5, res4, res3 and an FPN down to stride 4 for the mask features."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from knnclip.export.fcclip.config import PixelDecoderConfig
from knnclip.export.fcclip.deform_attn import MSDeformAttn


def sine_position_embedding(x: Tensor, num_pos_feats: int, temperature: float = 10000.0) -> Tensor:
    """DETR's normalised sine embedding for an unpadded [B, C, H, W] map -> [B, 2*num_pos_feats, H, W]
    (y features first, then x)."""
    batch, _, height, width = x.shape
    eps, scale = 1e-6, 2 * math.pi
    y_embed = torch.arange(1, height + 1, dtype=torch.float32, device=x.device)
    x_embed = torch.arange(1, width + 1, dtype=torch.float32, device=x.device)
    y_embed = (y_embed / (height + eps) * scale)[:, None].expand(height, width)
    x_embed = (x_embed / (width + eps) * scale)[None, :].expand(height, width)
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=x.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos_x = x_embed[..., None] / dim_t
    pos_y = y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=3).flatten(2)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=3).flatten(2)
    pos = torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)
    return pos.unsqueeze(0).expand(batch, -1, -1, -1).to(x.dtype)


class EncoderLayer(nn.Module):
    """Post-norm: x = norm1(x + deform_attn(x + pos)); x = norm2(x + linear2(relu(linear1(x))))."""

    def __init__(self, cfg: PixelDecoderConfig, levels: int) -> None:
        super().__init__()
        d = cfg.conv_dim
        self.self_attn = MSDeformAttn(d, levels, cfg.encoder_heads, cfg.encoder_points)
        self.norm1 = nn.LayerNorm(d)
        self.linear1 = nn.Linear(d, cfg.encoder_ffn_dim)
        self.linear2 = nn.Linear(cfg.encoder_ffn_dim, d)
        self.norm2 = nn.LayerNorm(d)

    def forward(self, x: Tensor, pos: Tensor, reference_points: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        x = self.norm1(x + self.self_attn(x + pos, reference_points, x, shapes))
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class Encoder(nn.Module):
    def __init__(self, cfg: PixelDecoderConfig, levels: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg, levels) for _ in range(cfg.encoder_layers))


class DeformableTransformer(nn.Module):
    def __init__(self, cfg: PixelDecoderConfig, levels: int) -> None:
        super().__init__()
        self.level_embed = nn.Parameter(torch.zeros(levels, cfg.conv_dim))
        self.encoder = Encoder(cfg, levels)

    @staticmethod
    def reference_points(shapes: list[tuple[int, int]], device: torch.device) -> Tensor:
        """Pixel centres of every level in [0, 1], (x, y): [1, S, levels, 2] (no padding: valid ratio 1)."""
        refs = []
        for height, width in shapes:
            ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
            xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
            ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
            refs.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))
        return torch.cat(refs, 0)[None, :, None, :].expand(1, -1, len(shapes), 2)

    def forward(self, srcs: list[Tensor], pos: list[Tensor]) -> Tensor:
        # sizes read from the tensors, not turned into Python ints: an export traces them, so the
        # graph takes any input size (a Python int would be baked in as a constant)
        shapes = [(s.shape[2], s.shape[3]) for s in srcs]
        x = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        lvl_pos = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[i].view(1, 1, -1) for i, p in enumerate(pos)], 1
        )
        ref = self.reference_points(shapes, x.device).to(x.dtype)
        for layer in self.encoder.layers:
            x = layer(x, lvl_pos, ref, shapes)
        return x


class ConvNorm(nn.Conv2d):
    """detectron2 Conv2d with a GroupNorm (parameters ``weight`` and ``norm.*``) and optional ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, groups: int, relu: bool) -> None:
        super().__init__(cin, cout, kernel_size=kernel, padding=kernel // 2, bias=False)
        self.norm = nn.GroupNorm(groups, cout)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(super().forward(x))
        return F.relu(x) if self.relu else x


class PixelDecoder(nn.Module):
    """``forward(res2..res5) -> (mask_features [B, mask_dim, H/4, W/4], [3 maps at strides 32, 16, 8])``."""

    def __init__(self, cfg: PixelDecoderConfig, in_channels: tuple[int, ...]) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.conv_dim
        levels = 3  # res5, res4, res3
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(cfg.num_groups, d))
            for c in reversed(in_channels[1:])
        )
        self.transformer = DeformableTransformer(cfg, levels)
        self.mask_features = nn.Conv2d(d, cfg.mask_dim, kernel_size=1)
        # FPN levels below the encoder's finest stride (8) down to common_stride: one for stride 4.
        self.num_fpn_levels = int(math.log2(8) - math.log2(cfg.common_stride))
        for i in range(self.num_fpn_levels):
            self.add_module(f"adapter_{i + 1}", ConvNorm(in_channels[i], d, 1, cfg.num_groups, relu=False))
            self.add_module(f"layer_{i + 1}", ConvNorm(d, d, 3, cfg.num_groups, relu=True))

    def forward(self, res: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """``res`` = [res2, res3, res4, res5]."""
        inputs = res[1:][::-1]  # res5, res4, res3
        srcs = [proj(x.float()) for proj, x in zip(self.input_proj, inputs, strict=True)]
        pos = [sine_position_embedding(x, self.cfg.conv_dim // 2) for x in inputs]
        y = self.transformer(srcs, pos)
        batch = y.shape[0]
        outs = []
        start = 0
        for s in srcs:
            height, width = s.shape[-2:]
            outs.append(y[:, start : start + height * width].transpose(1, 2).reshape(batch, -1, height, width))
            start += height * width
        for i in reversed(range(self.num_fpn_levels)):  # top-down: coarse to fine
            lateral = getattr(self, f"adapter_{i + 1}")(res[i].float())
            up = F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(getattr(self, f"layer_{i + 1}")(lateral + up))
        return self.mask_features(outs[-1]), outs[:3]
