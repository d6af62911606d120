"""FC-CLIP's masked-attention transformer decoder (Mask2Former's, with FC-CLIP's class head: the
query plus its mask-pooled pixel features, projected into CLIP space and scored against text)."""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from knnclip.export.fcclip.config import DecoderConfig
from knnclip.export.fcclip.pixel_decoder import sine_position_embedding


def mask_pool(features: Tensor, mask_logits: Tensor) -> Tensor:
    """Mean of ``features`` [B, C, H, W] inside each mask (``mask_logits`` [B, Q, h, w] resized
    bilinearly to H x W, then > 0) -> [B, Q, C]. An empty mask gives zeros (FC-CLIP's MaskPooling)."""
    if mask_logits.shape[-2:] != features.shape[-2:]:
        mask_logits = F.interpolate(mask_logits, size=features.shape[-2:], mode="bilinear", align_corners=False)
    mask = (mask_logits > 0).to(features.dtype)
    mask = mask / (mask.sum(dim=(-1, -2), keepdim=True) + 1e-8)
    return torch.einsum("bchw,bqhw->bqc", features, mask)


def classification_logits(
    embeddings: Tensor, text_classifier: Tensor, logit_scale: Tensor, num_templates: list[int]
) -> Tensor:
    """Cosine logits against ``text_classifier`` (one row per synonym, void last), scaled by
    ``min(exp(logit_scale), 100)``, max over each class's synonyms -> [..., classes + 1]."""
    x = F.normalize(embeddings, dim=-1)
    logits = torch.clamp(logit_scale.exp(), max=100) * x @ text_classifier.T
    per_class = []
    start = 0
    for n in num_templates:
        per_class.append(logits[..., start : start + n].amax(-1))
        start += n
    per_class.append(logits[..., -1])
    return torch.stack(per_class, dim=-1)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int, layers: int) -> None:
        super().__init__()
        sizes = [dim] + [hidden] * (layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, [*sizes[1:], out], strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class Attention(nn.Module):
    """nn.MultiheadAttention's parameters (in_proj_weight/bias, out_proj) in a batch-first form whose
    mask is additive (0 or -inf), which exports plainly."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """q [B, Lq, C], k/v [B, Lk, C], mask [B, heads, Lq, Lk] additive."""
        dim = q.shape[-1]
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        split = lambda x: x.reshape(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(F.linear(q, wq, bq)), split(F.linear(k, wk, bk)), split(F.linear(v, wv, bv))
        scores = (q * (dim // self.heads) ** -0.5) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        out = scores.softmax(-1) @ v
        return self.out_proj(out.transpose(1, 2).reshape(q.shape[0], -1, dim))


class CrossAttentionLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.multihead_attn = Attention(cfg.hidden_dim, cfg.heads)
        self.norm = nn.LayerNorm(cfg.hidden_dim)

    def forward(self, x: Tensor, memory: Tensor, mask: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        return self.norm(x + self.multihead_attn(x + query_pos, memory + pos, memory, mask))


class SelfAttentionLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg.hidden_dim, cfg.heads)
        self.norm = nn.LayerNorm(cfg.hidden_dim)

    def forward(self, x: Tensor, query_pos: Tensor) -> Tensor:
        qk = x + query_pos
        return self.norm(x + self.self_attn(qk, qk, x))


class FFNLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.linear1 = nn.Linear(cfg.hidden_dim, cfg.ffn_dim)
        self.linear2 = nn.Linear(cfg.ffn_dim, cfg.hidden_dim)
        self.norm = nn.LayerNorm(cfg.hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.linear2(F.relu(self.linear1(x))))


class TransformerDecoder(nn.Module):
    """``forward(multi_scale [3 maps], mask_features, text_classifier, num_templates)`` ->
    (class logits [B, Q, classes + 1], mask logits [B, Q, H/4, W/4], auxiliary predictions)."""

    def __init__(self, cfg: DecoderConfig, mask_dim: int, clip_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_dim
        self.transformer_self_attention_layers = nn.ModuleList(SelfAttentionLayer(cfg) for _ in range(cfg.layers))
        self.transformer_cross_attention_layers = nn.ModuleList(CrossAttentionLayer(cfg) for _ in range(cfg.layers))
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(cfg) for _ in range(cfg.layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.query_feat = nn.Embedding(cfg.num_queries, d)
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        self.level_embed = nn.Embedding(cfg.num_feature_levels, d)
        self.mask_embed = MLP(d, d, mask_dim, 3)
        # Mask-pooled pixel features (mask_dim wide) projected to the query width.
        self._mask_pooling_proj = nn.Sequential(nn.LayerNorm(mask_dim), nn.Linear(mask_dim, d))
        self.class_embed = MLP(d, d, clip_dim, 3)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def heads(self, x: Tensor, mask_features: Tensor, target: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """Class embeddings (in CLIP space, not normalised), mask logits, and the additive attention
        mask for the next layer at ``target`` size."""
        q = self.decoder_norm(x)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(q), mask_features)
        pooled = self._mask_pooling_proj(mask_pool(mask_features, masks))
        class_embed = self.class_embed(pooled + q)
        small = F.interpolate(masks, size=target, mode="bilinear", align_corners=False).flatten(2)
        blocked = small.sigmoid() < 0.5
        # A query whose mask covers nothing would attend to nothing: let it attend everywhere.
        blocked = blocked & ~blocked.all(dim=-1, keepdim=True)
        neg_inf = torch.full((), float("-inf"), dtype=x.dtype, device=x.device)
        attn_mask = torch.where(blocked, neg_inf, torch.zeros((), dtype=x.dtype, device=x.device))
        return class_embed, masks, attn_mask.unsqueeze(1)

    def forward(
        self, multi_scale: list[Tensor], mask_features: Tensor
    ) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
        """-> (class embeddings [B, Q, E], mask logits [B, Q, H/4, W/4], the same of every earlier
        layer (auxiliary predictions)). :meth:`logits` scores embeddings against text."""
        levels = self.cfg.num_feature_levels
        sizes = [m.shape[-2:] for m in multi_scale]  # traced by an export, not baked in (see the pixel decoder)
        pos = [sine_position_embedding(m, self.cfg.hidden_dim // 2).flatten(2).transpose(1, 2) for m in multi_scale]
        src = [
            m.flatten(2).transpose(1, 2) + self.level_embed.weight[i][None, None, :] for i, m in enumerate(multi_scale)
        ]
        batch = mask_features.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(batch, -1, -1)
        x = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)
        predictions = [self.heads(x, mask_features, cast(tuple[int, int], sizes[0]))]
        for i in range(self.cfg.layers):
            level = i % levels
            attn_mask = predictions[-1][2].expand(-1, self.cfg.heads, -1, -1)
            x = self.transformer_cross_attention_layers[i](x, src[level], attn_mask, pos[level], query_pos)
            x = self.transformer_self_attention_layers[i](x, query_pos)
            x = self.transformer_ffn_layers[i](x)
            predictions.append(self.heads(x, mask_features, cast(tuple[int, int], sizes[(i + 1) % levels])))
        class_embed, masks, _ = predictions[-1]
        return class_embed, masks, [(c, m) for c, m, _ in predictions[:-1]]

    def logits(self, class_embed: Tensor, text_classifier: Tensor, num_templates: list[int]) -> Tensor:
        """In-vocabulary class logits [..., classes + 1] of class embeddings."""
        return classification_logits(class_embed, text_classifier, self.logit_scale, num_templates)
