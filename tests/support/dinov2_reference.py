"""An independent DINOv2 forward in NumPy float64, written from the architecture, and random
checkpoints in the official layout (names and shapes as the official code writes them).

The only borrowed piece is the position-embedding resize for sizes other than the training
size: the official code calls ``torch.nn.functional.interpolate`` (bicubic, optionally
antialiased), so the reference calls that same function, in float64.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from tests.support.fixture_files import fixture_dir

if TYPE_CHECKING:
    import torch

OFFICIAL_DEFAULTS: dict[str, Any] = dict(
    img_size=224,
    patch_size=16,
    in_chans=3,
    embed_dim=768,
    depth=12,
    num_heads=12,
    mlp_ratio=4.0,
    qkv_bias=True,
    ffn_bias=True,
    proj_bias=True,
    init_values=None,
    ffn_layer="mlp",
    num_register_tokens=0,
    interpolate_antialias=False,
    interpolate_offset=0.1,
)


def official_args(**overrides: Any) -> dict[str, Any]:
    args = dict(OFFICIAL_DEFAULTS)
    args.update(overrides)
    return args


def ffn_hidden(args: dict[str, Any]) -> int:
    hidden = int(args["embed_dim"] * args["mlp_ratio"])
    if args["ffn_layer"] in ("swiglu", "swiglufused"):
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    return hidden


def random_official_checkpoint(args: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """float32 weights named like ``dinov2_vit*14*_pretrain.pth``; scales keep activations O(1)."""
    rng = np.random.default_rng(seed)
    d, p, c = args["embed_dim"], args["patch_size"], args["in_chans"]
    grid = args["img_size"] // p
    hidden = ffn_hidden(args)

    def w(*shape: int, scale: float | None = None) -> np.ndarray:
        s = scale if scale is not None else 1.0 / math.sqrt(shape[-1])
        return (rng.standard_normal(shape) * s).astype(np.float32)

    sd = {
        "cls_token": w(1, 1, d, scale=0.5),
        "pos_embed": w(1, grid * grid + 1, d, scale=0.5),
        "mask_token": w(1, d, scale=0.5),
        "patch_embed.proj.weight": w(d, c, p, p, scale=1.0 / math.sqrt(c * p * p)),
        "patch_embed.proj.bias": w(d, scale=0.1),
        "norm.weight": 1 + w(d, scale=0.1),
        "norm.bias": w(d, scale=0.1),
    }
    if args["num_register_tokens"]:
        sd["register_tokens"] = w(1, args["num_register_tokens"], d, scale=0.5)
    for i in range(args["depth"]):
        b = f"blocks.{i}."
        sd |= {
            b + "norm1.weight": 1 + w(d, scale=0.1),
            b + "norm1.bias": w(d, scale=0.1),
            b + "attn.qkv.weight": w(3 * d, d),
            b + "attn.proj.weight": w(d, d),
            b + "norm2.weight": 1 + w(d, scale=0.1),
            b + "norm2.bias": w(d, scale=0.1),
        }
        if args["qkv_bias"]:
            sd[b + "attn.qkv.bias"] = w(3 * d, scale=0.1)
        if args["proj_bias"]:
            sd[b + "attn.proj.bias"] = w(d, scale=0.1)
        if args["init_values"]:
            sd[b + "ls1.gamma"] = w(d, scale=0.5)
            sd[b + "ls2.gamma"] = w(d, scale=0.5)
        if args["ffn_layer"] == "mlp":
            names = [("mlp.fc1", hidden, d), ("mlp.fc2", d, hidden)]
        else:
            names = [("mlp.w12", 2 * hidden, d), ("mlp.w3", d, hidden)]
        for name, rows, cols in names:
            sd[f"{b}{name}.weight"] = w(rows, cols)
            if args["ffn_bias"]:
                sd[f"{b}{name}.bias"] = w(rows, scale=0.1)
    return sd


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * weight + bias


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _pos_embed(sd: dict[str, np.ndarray], args: dict[str, Any], rows: int, cols: int) -> np.ndarray:
    pos = sd["pos_embed"].astype(np.float64)
    grid = args["img_size"] // args["patch_size"]
    if rows == cols and rows * cols == grid * grid:
        return pos
    import torch
    import torch.nn.functional as F

    patch = torch.from_numpy(pos[:, 1:].reshape(1, grid, grid, -1)).permute(0, 3, 1, 2)
    if args["interpolate_offset"]:
        off = args["interpolate_offset"]
        kw: dict[str, Any] = {"scale_factor": ((rows + off) / grid, (cols + off) / grid)}
    else:
        kw = {"size": (rows, cols)}
    patch = F.interpolate(patch, mode="bicubic", antialias=args["interpolate_antialias"], **kw)
    assert tuple(patch.shape[-2:]) == (rows, cols)
    patch = patch.permute(0, 2, 3, 1).reshape(1, rows * cols, -1).numpy()
    return np.concatenate([pos[:, :1], patch], axis=1)


def reference_forward(sd: dict[str, np.ndarray], args: dict[str, Any], images: np.ndarray) -> dict[str, np.ndarray]:
    """keys [B, N, D] (last block qkv middle third, patch tokens), cls [B, D], registers [B, R, D],
    patch [B, N, D] (final norm), all float64."""
    f = {k: v.astype(np.float64) for k, v in sd.items()}
    x_img = images.astype(np.float64)
    batch, _, height, width = x_img.shape
    p, d, heads = args["patch_size"], args["embed_dim"], args["num_heads"]
    rows, cols = height // p, width // p
    # Patch embedding as a matrix product over non-overlapping p x p patches, row-major grid.
    patches = x_img.reshape(batch, -1, rows, p, cols, p).transpose(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, -1)
    x = patches @ f["patch_embed.proj.weight"].reshape(d, -1).T + f["patch_embed.proj.bias"]
    x = np.concatenate([np.broadcast_to(f["cls_token"], (batch, 1, d)), x], axis=1)
    x = x + _pos_embed(sd, args, rows, cols)
    r = args["num_register_tokens"]
    if r:
        x = np.concatenate([x[:, :1], np.broadcast_to(f["register_tokens"], (batch, r, d)), x[:, 1:]], axis=1)

    def lin(name: str, v: np.ndarray) -> np.ndarray:
        out = v @ f[name + ".weight"].T
        return out + f[name + ".bias"] if name + ".bias" in f else out

    keys = None
    for i in range(args["depth"]):
        b = f"blocks.{i}."
        h = _layer_norm(x, f[b + "norm1.weight"], f[b + "norm1.bias"])
        qkv = lin(b + "attn.qkv", h)
        if i == args["depth"] - 1:
            keys = qkv[:, 1 + r :, d : 2 * d]
        q, k, v = (
            qkv[..., j * d : (j + 1) * d].reshape(batch, -1, heads, d // heads).transpose(0, 2, 1, 3) for j in range(3)
        )
        attn = _softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // heads))
        a = lin(b + "attn.proj", (attn @ v).transpose(0, 2, 1, 3).reshape(batch, -1, d))
        x = x + (a * f[b + "ls1.gamma"] if b + "ls1.gamma" in f else a)
        h = _layer_norm(x, f[b + "norm2.weight"], f[b + "norm2.bias"])
        if args["ffn_layer"] == "mlp":
            m = lin(b + "mlp.fc2", 0.5 * (u := lin(b + "mlp.fc1", h)) * (1 + _erf(u / math.sqrt(2))))
        else:
            u = lin(b + "mlp.w12", h)
            a1, a2 = np.split(u, 2, axis=-1)
            m = lin(b + "mlp.w3", a1 / (1 + np.exp(-a1)) * a2)
        x = x + (m * f[b + "ls2.gamma"] if b + "ls2.gamma" in f else m)
    x = _layer_norm(x, f["norm.weight"], f["norm.bias"])
    return {"keys": keys, "cls": x[:, 0], "registers": x[:, 1 : 1 + r], "patch": x[:, 1 + r :]}


def rel_l2(actual: Any, reference: Any) -> float:
    a = np.asarray(actual, np.float64)
    r = np.asarray(reference, np.float64)
    return float(np.linalg.norm(a - r) / np.linalg.norm(r))


FIXTURE = fixture_dir("dinov2")


def fixture_config() -> dict:
    return json.loads((FIXTURE / "config.json").read_text())


def as_tokens(keys_map: torch.Tensor) -> np.ndarray:
    """[B, D, h, w] -> [B, h*w, D] (row-major grid), the fixture's layout."""
    return keys_map.flatten(2).transpose(1, 2).numpy()


def to_torch(sd: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    import torch

    return {k: torch.from_numpy(v) for k, v in sd.items()}


ARCHITECTURES = {
    # ViT-S/B/L-like: MLP FFN, no registers, the +0.1 offset resize without antialiasing.
    "mlp-noreg": official_args(embed_dim=64, depth=2, num_heads=4, patch_size=14, img_size=98, init_values=1.0),
    # ViT-g-reg-like at another width/depth, antialiased resize to size.
    "swiglu-reg": official_args(
        embed_dim=48,
        depth=3,
        num_heads=3,
        patch_size=14,
        img_size=70,
        init_values=1.0,
        ffn_layer="swiglufused",
        num_register_tokens=4,
        interpolate_antialias=True,
        interpolate_offset=0.0,
    ),
    # The constructor defaults: patch 16, no LayerScale, biases off where the arguments allow.
    "defaults-nobias": official_args(embed_dim=32, depth=2, num_heads=2, img_size=64, qkv_bias=False, ffn_bias=False),
    "swiglu-1reg": official_args(
        embed_dim=40,
        depth=1,
        num_heads=5,
        patch_size=8,
        img_size=48,
        mlp_ratio=2.5,
        ffn_layer="swiglu",
        num_register_tokens=1,
        init_values=1e-5,
    ),
}
