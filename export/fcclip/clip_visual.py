"""The open_clip ConvNeXt CLIP image tower as FC-CLIP uses it: the timm ConvNeXt trunk for dense
features (stem, res2..res5, ``norm_pre``) and the pooled head (``trunk.head`` + ``visual.head``)
that projects mask-pooled features into the CLIP embedding space.

Module names follow the official state dict (``visual.trunk.stages.{i}.blocks.{j}.conv_dw``...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from knnclip.export.fcclip.config import ClipConfig

CONVNEXT_EPS = 1e-6


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class Mlp(nn.Module):
    """fc1, exact GELU, fc2 (timm's Mlp)."""

    def __init__(self, dim: int, hidden: int, out: int, bias2: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out, bias=bias2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    """x + gamma * Mlp(LayerNorm(dwconv7x7(x))) with the MLP channels-last (timm, conv_mlp=False)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=CONVNEXT_EPS)
        self.mlp = Mlp(dim, 4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.mlp(self.norm(y)) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtStage(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, depth: int) -> None:
        super().__init__()
        if in_dim != out_dim:
            self.downsample = nn.Sequential(
                LayerNorm2d(in_dim, eps=CONVNEXT_EPS), nn.Conv2d(in_dim, out_dim, kernel_size=2, stride=2)
            )
        else:
            self.downsample = nn.Identity()  # type: ignore[assignment]  # any module mapping x to x
        self.blocks = nn.Sequential(*(ConvNeXtBlock(out_dim) for _ in range(depth)))

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class NormHead(nn.Module):
    """timm NormMlpClassifierHead with no classes: average pool, LayerNorm2d, flatten."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = LayerNorm2d(dim, eps=CONVNEXT_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.mean(dim=(2, 3), keepdim=True)).flatten(1)


class ConvNeXtTrunk(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        dims = cfg.dims
        self.stem = nn.Sequential(
            nn.Conv2d(3, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=CONVNEXT_EPS)
        )
        self.stages = nn.ModuleList(
            ConvNeXtStage(dims[max(i - 1, 0)], dims[i], depth) for i, depth in enumerate(cfg.depths)
        )
        self.head = NormHead(dims[-1])


class ProjectionHead(nn.Module):
    """open_clip TimmModel ``proj="mlp"``: Mlp(C, 2E, E), the second layer without bias."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.mlp = Mlp(cfg.dims[-1], cfg.head_hidden, cfg.embed_dim, bias2=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class ClipVisual(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.trunk = ConvNeXtTrunk(cfg)
        self.head = ProjectionHead(cfg)

    def features(self, images: Tensor) -> dict[str, Tensor]:
        """stem and res2..res5 (strides 4..32); ``clip_vis_dense`` is ``norm_pre(res5)``, the
        identity for ConvNeXt."""
        out = {}
        x = self.trunk.stem(images)
        out["stem"] = x
        for i, stage in enumerate(self.trunk.stages):
            x = stage(x)
            out[f"res{i + 2}"] = x
        out["clip_vis_dense"] = x
        return out

    def project_pooled(self, pooled: Tensor) -> Tensor:
        """[B, Q, C] mask-pooled dense features -> [B, Q, E] CLIP embeddings (trunk.head, visual.head)."""
        batch, queries, channels = pooled.shape
        x = self.trunk.head(pooled.reshape(batch * queries, channels, 1, 1))
        return self.head(x).reshape(batch, queries, -1)
