"""The DINOv2 vision transformer, written for export: static shapes, no data-dependent control
flow in ``forward``, and an optional fp16 compute mode that keeps LayerNorm, softmax and the
residual stream in fp32.

Parameter names follow the official checkpoints (``blocks.{i}.attn.qkv``, ``blocks.{i}.mlp.w12``,
``blocks.{i}.ls1.gamma``, ...), so an official ``state_dict`` loads as is.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from knnclip.engine.errors import InvalidInputError
from knnclip.export.dinov2.config import DinoV2Config

LAYER_NORM_EPS = 1e-6


def _linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` computed in the layer's weight dtype (fp16 layers take fp32 activations)."""
    return F.linear(x.to(layer.weight.dtype), layer.weight, layer.bias)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: DinoV2Config) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, images: Tensor) -> Tensor:
        x = self.proj(images.to(self.proj.weight.dtype))
        return x.flatten(2).transpose(1, 2).float()  # [B, h*w, D], row-major over the grid


class Attention(nn.Module):
    def __init__(self, cfg: DinoV2Config) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.scale = cfg.head_dim**-0.5
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=cfg.proj_bias)

    def keys(self, x: Tensor) -> Tensor:
        """The middle third of ``qkv(x)`` (the keys of every head, head-major), without computing q and v."""
        dim = x.shape[-1]
        w = self.qkv.weight[dim : 2 * dim]
        b = None if self.qkv.bias is None else self.qkv.bias[dim : 2 * dim]
        return F.linear(x.to(w.dtype), w, b)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = _linear(self.qkv, x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, head_dim]
        if q.dtype == torch.float32:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            # Reduced precision: the products in fp16, the softmax in fp32 (its sums overflow fp16).
            scores = (q * self.scale) @ k.transpose(-2, -1)
            out = scores.float().softmax(dim=-1).to(v.dtype) @ v
        return _linear(self.proj, out.transpose(1, 2).reshape(batch, tokens, dim))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x.float() * self.gamma


class Mlp(nn.Module):
    def __init__(self, cfg: DinoV2Config) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.ffn_hidden, bias=cfg.ffn_bias)
        self.fc2 = nn.Linear(cfg.ffn_hidden, cfg.embed_dim, bias=cfg.ffn_bias)

    def forward(self, x: Tensor) -> Tensor:
        return _linear(self.fc2, F.gelu(_linear(self.fc1, x)))


class SwiGLU(nn.Module):
    """``w3(silu(a) * b)`` with ``[a, b] = w12(x)`` (the official fused SwiGLU FFN)."""

    def __init__(self, cfg: DinoV2Config) -> None:
        super().__init__()
        self.w12 = nn.Linear(cfg.embed_dim, 2 * cfg.ffn_hidden, bias=cfg.ffn_bias)
        self.w3 = nn.Linear(cfg.ffn_hidden, cfg.embed_dim, bias=cfg.ffn_bias)

    def forward(self, x: Tensor) -> Tensor:
        a, b = _linear(self.w12, x).chunk(2, dim=-1)
        return _linear(self.w3, F.silu(a) * b)


class Block(nn.Module):
    def __init__(self, cfg: DinoV2Config) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(cfg)
        self.ls1 = LayerScale(cfg.embed_dim, cfg.init_values) if cfg.init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=LAYER_NORM_EPS)
        self.mlp = SwiGLU(cfg) if cfg.ffn_layer == "swiglu" else Mlp(cfg)
        self.ls2 = LayerScale(cfg.embed_dim, cfg.init_values) if cfg.init_values else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # The residual stream stays fp32 whatever the compute dtype of the linear layers.
        x = x + self.ls1(self.attn(self.norm1(x))).float()
        return x + self.ls2(self.mlp(self.norm2(x))).float()


class DinoV2(nn.Module):
    """DINOv2 ViT. ``forward(images[B, 3, H, W]) -> keys[B, D, H/p, W/p]``: the last block's
    attention keys for the patch tokens (``blocks[-1].attn.qkv`` output, channels ``[D:2D]``).

    ``images`` are normalised with the ImageNet mean and std; H and W are multiples of the patch
    size. :meth:`forward_features` also returns the final-norm tokens (``cls``, ``registers``,
    ``patch``), as the official ``forward_features`` does.
    """

    def __init__(self, config: DinoV2Config) -> None:
        super().__init__()
        self.config = config
        d = config.embed_dim
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid_size**2 + 1, d))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, config.num_register_tokens, d)) if config.num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, d))  # used only in training; kept so checkpoints load strictly
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        # Set by fix_input_size(): a position embedding resized once, used instead of resizing per call.
        self.fixed_pos_embed: Tensor | None = None
        self.fixed_size: tuple[int, int] | None = None

    # -- input checks -----------------------------------------------------------------------------
    def check_images(self, images: Tensor) -> None:
        """Raise ``InvalidInputError`` for input the model cannot take (runs outside tracing too)."""
        cfg = self.config
        if not isinstance(images, Tensor):
            raise InvalidInputError(f"images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != cfg.in_chans:
            raise InvalidInputError(
                f"images must be [B, {cfg.in_chans}, H, W] (normalised RGB), got shape {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise InvalidInputError(f"images must be floating point (normalised), got {images.dtype}")
        height, width = images.shape[-2:]
        p = cfg.patch_size
        if height % p or width % p or height == 0 or width == 0:
            raise InvalidInputError(
                f"image size {height}x{width} is not a positive multiple of the patch size {p}; "
                f"resize or pad to e.g. {max(p, height // p * p)}x{max(p, width // p * p)}"
            )
        if self.fixed_size is not None and (height, width) != self.fixed_size:
            raise InvalidInputError(
                f"this model was fixed to {self.fixed_size[0]}x{self.fixed_size[1]} inputs, got {height}x{width}"
            )
        if not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
            if not bool(torch.isfinite(images).all()):
                raise InvalidInputError("images contain NaN or Inf values")

    # -- position embedding -------------------------------------------------------------------------
    def interpolate_pos_embed(self, height: int, width: int) -> Tensor:
        """Position embedding (CLS row first) for an input of ``height x width`` pixels, resized as
        the official ``interpolate_pos_encoding`` does."""
        cfg = self.config
        rows, cols = height // cfg.patch_size, width // cfg.patch_size
        side = cfg.grid_size
        if rows * cols == side * side and rows == cols:
            return self.pos_embed
        pos = self.pos_embed.float()
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if cfg.interpolate_offset:
            scale = ((rows + cfg.interpolate_offset) / side, (cols + cfg.interpolate_offset) / side)
            grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=cfg.interpolate_antialias)
        else:
            grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=cfg.interpolate_antialias)
        if tuple(grid.shape[-2:]) != (rows, cols):
            raise InvalidInputError(
                f"the position embedding resize gave a {tuple(grid.shape[-2:])} grid for {rows}x{cols} patches"
            )
        grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([pos[:, :1], grid], dim=1).to(self.pos_embed.dtype)

    @torch.no_grad()
    def fix_input_size(self, height: int, width: int) -> DinoV2:
        """Resize the position embedding for ``height x width`` once and keep it as a constant:
        the form that exports to ONNX (antialiased bicubic resizing has no faithful ONNX op)."""
        self.fixed_size = None
        self.check_images(torch.zeros(1, self.config.in_chans, height, width))
        self.fixed_pos_embed = self.interpolate_pos_embed(height, width).detach().clone()
        self.fixed_size = (height, width)
        return self

    # -- forward ------------------------------------------------------------------------------------
    def tokens(self, images: Tensor) -> Tensor:
        """Patch embedding + CLS + position embedding, then the register tokens after CLS: [B, 1+R+N, D]."""
        x = self.patch_embed(images)
        batch = x.shape[0]
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x], dim=1)
        if self.fixed_pos_embed is not None:
            pos = self.fixed_pos_embed
        else:
            pos = self.interpolate_pos_embed(images.shape[-2], images.shape[-1])
        x = x + pos
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(batch, -1, -1), x[:, 1:]], dim=1)
        return x

    def _grid(self, tokens: Tensor, height: int, width: int) -> Tensor:
        """[B, N, C] patch tokens to a [B, C, H/p, W/p] map."""
        p = self.config.patch_size
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height // p, width // p)

    def forward(self, images: Tensor) -> Tensor:
        self.check_images(images)
        x = self.tokens(images)
        for block in self.blocks[:-1]:
            x = block(x)
        last = cast(Block, self.blocks[-1])
        keys = last.attn.keys(last.norm1(x))[:, 1 + self.config.num_register_tokens :].float()
        return self._grid(keys, images.shape[-2], images.shape[-1])

    def forward_features(self, images: Tensor) -> dict[str, Tensor]:
        """keys [B, D, h, w] plus the final-norm tokens: cls [B, D], registers [B, R, D], patch [B, h*w, D]."""
        self.check_images(images)
        x = self.tokens(images)
        for block in self.blocks[:-1]:
            x = block(x)
        last = cast(Block, self.blocks[-1])
        start = 1 + self.config.num_register_tokens
        keys = last.attn.keys(last.norm1(x))[:, start:].float()
        x = self.norm(last(x))
        return {
            "keys": self._grid(keys, images.shape[-2], images.shape[-1]),
            "cls": x[:, 0],
            "registers": x[:, 1:start],
            "patch": x[:, start:],
        }

    # -- precision ----------------------------------------------------------------------------------
    def half_compute_(self) -> DinoV2:
        """Convert the patch embedding and every linear layer to fp16, in place. LayerNorm, LayerScale,
        tokens, position embedding, softmax and the residual stream stay fp32 (LayerNorm and
        softmax sums overflow fp16 in large ViTs)."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                module.half()
        return self


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(cfg: DinoV2Config, height: int, width: int) -> float:
    """Multiply-adds x 2 of one forward to the keys (for throughput figures in benchmarks)."""
    n = (height // cfg.patch_size) * (width // cfg.patch_size) + 1 + cfg.num_register_tokens
    d = cfg.embed_dim
    ffn = (3 if cfg.ffn_layer == "swiglu" else 2) * d * cfg.ffn_hidden
    per_block = n * (4 * d * d + ffn) + 2 * n * n * d
    patch = n * cfg.in_chans * cfg.patch_size**2 * d
    return 2.0 * (patch + (cfg.depth - 1) * per_block + n * d * d)


__all__ = ["DinoV2", "flops_per_image", "num_parameters"]
