"""Seeded random weights for the demo and tests (no pretrained weights can be downloaded here).

Every parameter gets a value by its role, so activations stay in a sane range through deep
stacks: norms 1 and 0, linear and conv weights N(0, 1/fan_in), biases small, layer scales 0.5,
position and token embeddings small, queries N(0, 1), deformable-attention offsets on Deformable
DETR's direction grid, logit scales log(1/0.07).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn


@torch.no_grad()
def seeded_init_(module: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter of ``module`` in place from ``seed``; returns ``module``."""
    g = torch.Generator().manual_seed(seed)

    def normal(p: torch.Tensor, std: float) -> None:
        p.copy_(torch.randn(p.shape, generator=g) * std)

    done: set[int] = set()
    for name, m in module.named_modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            if m.weight is not None:
                m.weight.fill_(1.0)
                m.bias.zero_()
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            fan_in = m.weight[0].numel()
            normal(m.weight, 1.0 / math.sqrt(fan_in))
            if m.bias is not None:
                normal(m.bias, 0.02)
        elif isinstance(m, nn.Embedding):
            normal(m.weight, 0.1 if name.endswith("token_embedding") else 1.0)
        else:
            continue
        done.update(id(p) for p in m.parameters(recurse=False))
    for name, p in module.named_parameters():
        if id(p) in done:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "logit_scale":
            p.fill_(math.log(1 / 0.07))
        elif leaf == "gamma":
            p.fill_(0.5)
        elif leaf == "in_proj_weight":
            normal(p, 1.0 / math.sqrt(p.shape[1]))
        elif leaf == "text_projection":
            normal(p, 1.0 / math.sqrt(p.shape[0]))
        elif p.ndim == 1:
            normal(p, 0.02)
        else:
            normal(p, 0.1 if leaf in ("positional_embedding", "pos_embed") else 1.0)
    for m in module.modules():  # after the generic pass, which set these linears like any other
        offsets = getattr(m, "sampling_offsets", None)
        if isinstance(offsets, nn.Linear):  # a deformable attention: its heads, levels and points are ints
            attention = cast(Any, m)
            _offset_grid_(offsets, attention.heads, attention.levels, attention.points, g)
    return module


def _offset_grid_(linear: nn.Linear, heads: int, levels: int, points: int, g: torch.Generator) -> None:
    """Deformable DETR's initial sampling offsets (bias laid out [heads, levels, points, 2]):
    head h looks along angle 2 pi h / heads, its p-th point p + 1 cells away; weights near zero."""
    linear.weight.mul_(0.01)
    angles = 2 * math.pi * torch.arange(heads) / heads
    direction = torch.stack([angles.cos(), angles.sin()], -1)  # [heads, 2]
    steps = torch.arange(1, points + 1, dtype=torch.float32)
    grid = direction[:, None, None, :] * steps[None, None, :, None]  # [heads, 1, points, 2]
    bias = grid.expand(heads, levels, points, 2).reshape(-1)
    linear.bias.copy_(bias + 0.1 * torch.randn(bias.shape, generator=g))
