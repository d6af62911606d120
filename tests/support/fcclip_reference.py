"""An independent float64 forward of FC-CLIP's image part, written over the state dict with the
primitives the official code uses where ours differ: ``F.grid_sample`` for deformable sampling
(the engine gathers), ``F.multi_head_attention_forward`` for attention (the engine writes its own),
``F.conv2d``/``F.layer_norm``/``F.group_norm`` directly, the encoder's reference points and
the decoder's attention masks computed as the official modules compute them. It takes the
architecture from the state dict's shapes and a few counts, so it checks our modules at widths,
depths and query counts no recorded fixture covers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _ln(x: Tensor, sd: dict, p: str, eps: float = 1e-5) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], eps)


def _lin(x: Tensor, sd: dict, p: str) -> Tensor:
    return F.linear(x, sd[f"{p}.weight"], sd.get(f"{p}.bias"))


def _ln2d(x: Tensor, sd: dict, p: str) -> Tensor:
    return _ln(x.permute(0, 2, 3, 1), sd, p, 1e-6).permute(0, 3, 1, 2)


def convnext(x: Tensor, sd: dict, depths: list[int]) -> dict[str, Tensor]:
    t = "backbone.clip_model.visual.trunk"
    x = _ln2d(F.conv2d(x, sd[f"{t}.stem.0.weight"], sd[f"{t}.stem.0.bias"], stride=4), sd, f"{t}.stem.1")
    feats = {}
    for i, depth in enumerate(depths):
        if i > 0:
            x = _ln2d(x, sd, f"{t}.stages.{i}.downsample.0")
            down = f"{t}.stages.{i}.downsample.1"
            x = F.conv2d(x, sd[f"{down}.weight"], sd[f"{down}.bias"], stride=2)
        for j in range(depth):
            b = f"{t}.stages.{i}.blocks.{j}"
            y = F.conv2d(x, sd[f"{b}.conv_dw.weight"], sd[f"{b}.conv_dw.bias"], padding=3, groups=x.shape[1])
            y = _ln(y.permute(0, 2, 3, 1), sd, f"{b}.norm", 1e-6)
            y = _lin(F.gelu(_lin(y, sd, f"{b}.mlp.fc1")), sd, f"{b}.mlp.fc2") * sd[f"{b}.gamma"]
            x = x + y.permute(0, 3, 1, 2)
        feats[f"res{i + 2}"] = x
    return feats


def _sine(h: int, w: int, d: int) -> Tensor:
    """DETR PositionEmbeddingSine(normalize=True) for an unmasked h x w map -> [2d, h, w]."""
    y = torch.arange(1, h + 1, dtype=torch.float64)[:, None].expand(h, w) / (h + 1e-6) * 2 * math.pi
    x = torch.arange(1, w + 1, dtype=torch.float64)[None, :].expand(h, w) / (w + 1e-6) * 2 * math.pi
    dim_t = 10000 ** (2 * (torch.arange(d, dtype=torch.float64) // 2) / d)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=3).flatten(2)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=3).flatten(2)
    return torch.cat((py, px), dim=2).permute(2, 0, 1)


def _deform_attn(query, ref, value_in, shapes, sd, p, heads, points):
    """Multi-scale deformable attention through grid_sample, as the official PyTorch fallback."""
    n, lq, c = query.shape
    levels = len(shapes)
    value = _lin(value_in, sd, f"{p}.value_proj").view(n, -1, heads, c // heads)
    offsets = _lin(query, sd, f"{p}.sampling_offsets").view(n, lq, heads, levels, points, 2)
    weights = _lin(query, sd, f"{p}.attention_weights").view(n, lq, heads, levels * points).softmax(-1)
    weights = weights.view(n, lq, heads, levels, points)
    normaliser = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype)
    loc = ref[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * loc - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = values[lvl].flatten(2).transpose(1, 2).reshape(n * heads, c // heads, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    a = weights.transpose(1, 2).reshape(n * heads, 1, lq, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * a).sum(-1).view(n, c, lq)
    return _lin(out.transpose(1, 2), sd, f"{p}.output_proj")


def pixel_decoder(feats: dict, sd: dict, enc_layers: int, heads: int, points: int) -> tuple[Tensor, list[Tensor]]:
    p = "sem_seg_head.pixel_decoder"
    groups = 32
    inputs = [feats["res5"], feats["res4"], feats["res3"]]
    srcs = [
        F.group_norm(
            F.conv2d(x, sd[f"{p}.input_proj.{i}.0.weight"], sd[f"{p}.input_proj.{i}.0.bias"]),
            groups,
            sd[f"{p}.input_proj.{i}.1.weight"],
            sd[f"{p}.input_proj.{i}.1.bias"],
        )
        for i, x in enumerate(inputs)
    ]
    d = srcs[0].shape[1]
    shapes = [tuple(s.shape[-2:]) for s in srcs]
    src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
    level_embed = sd[f"{p}.transformer.level_embed"]
    pos = torch.cat([_sine(h, w, d // 2).flatten(1).T[None] + level_embed[i] for i, (h, w) in enumerate(shapes)], 1)
    # reference points: pixel centres over valid ratios of 1, one per level (official get_reference_points)
    refs = []
    for h, w in shapes:
        ry, rx = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=torch.float64) / h,
            torch.linspace(0.5, w - 0.5, w, dtype=torch.float64) / w,
            indexing="ij",
        )
        refs.append(torch.stack((rx.reshape(-1), ry.reshape(-1)), -1))
    ref = torch.cat(refs, 0)[None, :, None].expand(1, -1, len(shapes), 2)
    x = src
    for i in range(enc_layers):
        e = f"{p}.transformer.encoder.layers.{i}"
        x = _ln(x + _deform_attn(x + pos, ref, x, shapes, sd, f"{e}.self_attn", heads, points), sd, f"{e}.norm1")
        x = _ln(x + _lin(F.relu(_lin(x, sd, f"{e}.linear1")), sd, f"{e}.linear2"), sd, f"{e}.norm2")
    outs, start = [], 0
    for h, w in shapes:
        outs.append(x[:, start : start + h * w].transpose(1, 2).reshape(1, d, h, w))
        start += h * w
    lateral = F.group_norm(
        F.conv2d(feats["res2"], sd[f"{p}.adapter_1.weight"]),
        groups,
        sd[f"{p}.adapter_1.norm.weight"],
        sd[f"{p}.adapter_1.norm.bias"],
    )
    y = lateral + F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
    y = F.relu(
        F.group_norm(
            F.conv2d(y, sd[f"{p}.layer_1.weight"], padding=1),
            groups,
            sd[f"{p}.layer_1.norm.weight"],
            sd[f"{p}.layer_1.norm.bias"],
        )
    )
    return F.conv2d(y, sd[f"{p}.mask_features.weight"], sd[f"{p}.mask_features.bias"]), outs


def _mha(q, k, v, sd, p, heads, mask=None):
    """nn.MultiheadAttention's functional path, sequence-first as Mask2Former calls it."""
    out, _ = F.multi_head_attention_forward(
        q,
        k,
        v,
        q.shape[-1],
        heads,
        sd[f"{p}.in_proj_weight"],
        sd[f"{p}.in_proj_bias"],
        None,
        None,
        False,
        0.0,
        sd[f"{p}.out_proj.weight"],
        sd[f"{p}.out_proj.bias"],
        training=False,
        need_weights=False,
        attn_mask=mask,
    )
    return out


def _mlp3(x, sd, p):
    for i in range(3):
        x = _lin(x, sd, f"{p}.layers.{i}")
        x = F.relu(x) if i < 2 else x
    return x


def decoder(ms: list[Tensor], mask_features: Tensor, sd: dict, layers: int, heads: int) -> tuple[Tensor, Tensor]:
    """Mask2Former's masked-attention decoder with FC-CLIP's class head -> final (class_embed, masks)."""
    p = "sem_seg_head.predictor"
    d = ms[0].shape[1]
    src = [m.flatten(2).permute(2, 0, 1) + sd[f"{p}.level_embed.weight"][i][None, None] for i, m in enumerate(ms)]
    pos = [_sine(*m.shape[-2:], d // 2).flatten(1).T[:, None] for m in ms]
    q_pos = sd[f"{p}.query_embed.weight"][:, None]
    x = sd[f"{p}.query_feat.weight"][:, None]

    def heads_(x, size):
        q = _ln(x.transpose(0, 1), sd, f"{p}.decoder_norm")
        masks = torch.einsum("bqc,bchw->bqhw", _mlp3(q, sd, f"{p}.mask_embed"), mask_features)
        binary = (masks > 0).to(masks.dtype)
        pooled = torch.einsum("bchw,bqhw->bqc", mask_features, binary / (binary.sum((-1, -2), keepdim=True) + 1e-8))
        pooled = _lin(_ln(pooled, sd, f"{p}._mask_pooling_proj.0"), sd, f"{p}._mask_pooling_proj.1")
        embed = _mlp3(pooled + q, sd, f"{p}.class_embed")
        small = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
        attn = small.sigmoid().flatten(2).unsqueeze(1).repeat(1, heads, 1, 1).flatten(0, 1) < 0.5
        attn[torch.where(attn.sum(-1) == attn.shape[-1])] = False  # official: unmask all-masked rows
        return embed, masks, attn

    embed, masks, attn = heads_(x, ms[0].shape[-2:])
    for i in range(layers):
        lvl = i % len(ms)
        c = f"{p}.transformer_cross_attention_layers.{i}"
        x = _ln(
            x + _mha(x + q_pos, src[lvl] + pos[lvl], src[lvl], sd, f"{c}.multihead_attn", heads, attn), sd, f"{c}.norm"
        )
        s = f"{p}.transformer_self_attention_layers.{i}"
        x = _ln(x + _mha(x + q_pos, x + q_pos, x, sd, f"{s}.self_attn", heads), sd, f"{s}.norm")
        f = f"{p}.transformer_ffn_layers.{i}"
        x = _ln(x + _lin(F.relu(_lin(x, sd, f"{f}.linear1")), sd, f"{f}.linear2"), sd, f"{f}.norm")
        embed, masks, attn = heads_(x, ms[(i + 1) % len(ms)].shape[-2:])
    return embed, masks


def reference_image_part(images: Tensor, sd: dict, cfg) -> dict[str, Tensor]:
    """float64 (pred_masks, class_embed, ov_embed, clip_vis_dense) of one image [1, 3, H, W]."""
    sd = {k: v.double() for k, v in sd.items()}
    x = images.double()
    feats = convnext(x, sd, list(cfg.clip.depths))
    pd = cfg.pixel_decoder
    mask_features, ms = pixel_decoder(feats, sd, pd.encoder_layers, pd.encoder_heads, pd.encoder_points)
    embed, masks = decoder(ms, mask_features, sd, cfg.decoder.layers, cfg.decoder.heads)
    dense = feats["res5"]
    small = F.interpolate(masks, size=dense.shape[-2:], mode="bilinear", align_corners=False)
    binary = (small > 0).double()
    pooled = torch.einsum("bchw,bqhw->bqc", dense, binary / (binary.sum((-1, -2), keepdim=True) + 1e-8))
    v = "backbone.clip_model.visual"
    z = _ln(pooled, sd, f"{v}.trunk.head.norm", 1e-6)
    ov = F.linear(F.gelu(_lin(z, sd, f"{v}.head.mlp.fc1")), sd[f"{v}.head.mlp.fc2.weight"])
    return {"pred_masks": masks, "class_embed": embed, "ov_embed": ov, "clip_vis_dense": dense}
