"""Multi-scale deformable attention (Deformable DETR) with bilinear sampling written as gathers.

``grid_sample`` would be the short form, but TensorRT's GridSample has had correctness bugs, and a
gather is an op every runtime executes exactly. The sampling reproduces
``grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)``: a location ``u`` in
[0, 1] maps to pixel coordinate ``u * size - 0.5``; each of the four neighbours outside the map
contributes zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def bilinear_gather(value: Tensor, height: int, width: int, locations: Tensor) -> Tensor:
    """Sample ``value`` [N, HW, C] (one level, row-major) at ``locations`` [N, L, P, 2] ((x, y) in
    [0, 1]) -> [N, L, P, C]."""
    n, _, channels = value.shape
    x = locations[..., 0] * width - 0.5
    y = locations[..., 1] * height - 0.5
    x0 = torch.floor(x)
    y0 = torch.floor(y)
    fx = x - x0
    fy = y - y0
    out = torch.zeros((*locations.shape[:-1], channels), dtype=value.dtype, device=value.device)
    flat_shape = (n, -1)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xi = x0 + dx
            yi = y0 + dy
            inside = (xi >= 0) & (xi <= width - 1) & (yi >= 0) & (yi <= height - 1)
            index = (yi.clamp(0, height - 1) * width + xi.clamp(0, width - 1)).to(torch.int64)
            gathered = torch.gather(value, 1, index.reshape(flat_shape).unsqueeze(-1).expand(-1, -1, channels))
            weight = (wx * wy * inside.to(value.dtype)).unsqueeze(-1)
            out = out + gathered.reshape(out.shape) * weight
    return out


class MSDeformAttn(nn.Module):
    """Parameter names as the official ``MSDeformAttn``: sampling_offsets, attention_weights,
    value_proj, output_proj."""

    def __init__(self, dim: int, levels: int, heads: int, points: int) -> None:
        super().__init__()
        self.levels, self.heads, self.points = levels, heads, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)

    def forward(
        self, query: Tensor, reference_points: Tensor, value_in: Tensor, shapes: list[tuple[int, int]]
    ) -> Tensor:
        """query [B, Lq, C]; reference_points [B, Lq, levels, 2] ((x, y) in [0, 1]); value_in [B, S, C]
        (the levels flattened and concatenated); shapes: (H, W) per level."""
        batch, lq, dim = query.shape
        h, lv, p = self.heads, self.levels, self.points
        head_dim = dim // h
        value = self.value_proj(value_in).reshape(batch, -1, h, head_dim)
        offsets = self.sampling_offsets(query).reshape(batch, lq, h, lv, p, 2)
        weights = F.softmax(self.attention_weights(query).reshape(batch, lq, h, lv * p), dim=-1)
        weights = weights.reshape(batch, lq, h, lv, p)
        normaliser = torch.stack([torch.stack([torch.as_tensor(w), torch.as_tensor(hh)]) for hh, w in shapes]).to(
            dtype=query.dtype, device=query.device
        )
        locations = reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        out = torch.zeros(batch, h, lq, head_dim, dtype=query.dtype, device=query.device)
        start = 0
        for level, (height, width) in enumerate(shapes):
            size = height * width
            # [B, HW, heads, d] -> [B*heads, HW, d]; locations [B, Lq, heads, P, 2] -> [B*heads, Lq, P, 2]
            v = value[:, start : start + size].permute(0, 2, 1, 3).reshape(batch * h, size, head_dim)
            loc = locations[:, :, :, level].permute(0, 2, 1, 3, 4).reshape(batch * h, lq, p, 2)
            sampled = bilinear_gather(v, height, width, loc)  # [B*heads, Lq, P, d]
            w = weights[:, :, :, level].permute(0, 2, 1, 3).reshape(batch * h, lq, p, 1)
            out = out + (sampled * w).sum(dim=2).reshape(batch, h, lq, head_dim)
            start += size
        return self.output_proj(out.permute(0, 2, 1, 3).reshape(batch, lq, dim))
