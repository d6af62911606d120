"""Multi-scale deformable attention (Deformable DETR), its bilinear sampling in one of two forms.

- ``"gather"`` (the default): four gathers per level. TensorRT's GridSample has had correctness
  bugs, and a gather is an op every runtime executes exactly.
- ``"grid"``: ``grid_sample`` (ONNX ``GridSample``), what CPU runtimes run fastest; ONNX Runtime
  and OpenVINO take it, and OpenVINO's bf16 needs it (its bf16 index arithmetic overflows in the
  gather form).

Both are ``grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)``: a location
``u`` in [0, 1] maps to pixel coordinate ``u * size - 0.5``; each of the four neighbours outside
the map contributes zero. :func:`set_sampling` picks the form for a whole model (the export's
``sampling``, recorded in the manifest).
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


SAMPLINGS = ("gather", "grid")


def bilinear_grid_sample(value: Tensor, height: int, width: int, locations: Tensor) -> Tensor:
    """:func:`bilinear_gather` through ``grid_sample``: ``value`` [N, HW, C], ``locations``
    [N, L, P, 2] ((x, y) in [0, 1]) -> [N, L, P, C]."""
    n, _, channels = value.shape
    image = value.transpose(1, 2).reshape(n, channels, height, width)
    sampled = F.grid_sample(image, locations * 2 - 1, mode="bilinear", padding_mode="zeros", align_corners=False)
    return sampled.permute(0, 2, 3, 1)  # [N, C, L, P] -> [N, L, P, C]


def set_sampling(model: nn.Module, sampling: str) -> str:
    """Make every deformable attention of ``model`` sample with ``sampling``; returns the previous form."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    previous = "gather"
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            previous, module.sampling = module.sampling, sampling
    return previous


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
        self.sampling = "gather"  # or "grid" (set_sampling); not a parameter: checkpoints are unaffected

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
            sample = bilinear_grid_sample if self.sampling == "grid" else bilinear_gather
            sampled = sample(v, height, width, loc)  # [B*heads, Lq, P, d]
            w = weights[:, :, :, level].permute(0, 2, 1, 3).reshape(batch * h, lq, p, 1)
            out = out + (sampled * w).sum(dim=2).reshape(batch, h, lq, head_dim)
            start += size
        return self.output_proj(out.permute(0, 2, 1, 3).reshape(batch, lq, dim))
