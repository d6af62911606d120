"""The CLIP text transformer of open_clip as FC-CLIP runs it: token + position embeddings, pre-LN
residual blocks with a causal mask and exact GELU, final LayerNorm, the end-of-text token's
feature projected by ``text_projection``. Parameter names follow ``clip_model.*``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from knnclip.export.fcclip.config import ClipConfig
from knnclip.export.fcclip.decoder import Attention

TEXT_LN_EPS = 1e-5


class TextMlp(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class ResidualBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=TEXT_LN_EPS)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=TEXT_LN_EPS)
        self.mlp = TextMlp(width)

    def forward(self, x: Tensor, causal: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, causal)
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualBlock(cfg.text_width, cfg.text_heads) for _ in range(cfg.text_layers))


class ClipText(nn.Module):
    """Holds the text parameters under the names of ``clip_model`` (mixed into :class:`ClipModel`)."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.text_width))
        self.transformer = TextTransformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.text_width, eps=TEXT_LN_EPS)
        self.text_projection = nn.Parameter(torch.zeros(cfg.text_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(0.0))

    def encode_text(self, tokens: Tensor) -> Tensor:
        """[N, context] int64 token ids (end-of-text has the largest id) -> [N, E], not normalised."""
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        causal = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
        for block in self.transformer.resblocks:
            x = block(x, causal)
        x = self.ln_final(x)
        eot = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return eot @ self.text_projection
