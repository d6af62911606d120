"""FC-CLIP at widths, depths, query counts, head counts and input sizes that no recorded fixture
covers, against an independent float64 forward written over the state dict with the official
code's primitives (tests/support/fcclip_reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from knnclip.export.fcclip import FCCLIP, FCCLIPConfig
from knnclip.export.fcclip.config import ClipConfig, DecoderConfig, PixelDecoderConfig
from knnclip.export.random_init import seeded_init_
from tests.support.fcclip_helpers import rel
from tests.support.fcclip_reference import reference_image_part

ARCHITECTURES = {
    "narrow, deep decoder": (
        FCCLIPConfig(
            clip=ClipConfig(
                depths=(1, 2, 1, 1), dims=(16, 32, 64, 128), embed_dim=48, text_width=32, text_layers=1, text_heads=2
            ),
            pixel_decoder=PixelDecoderConfig(
                conv_dim=32, mask_dim=32, encoder_layers=1, encoder_heads=2, encoder_points=2, encoder_ffn_dim=64
            ),
            decoder=DecoderConfig(hidden_dim=32, heads=2, ffn_dim=64, layers=4, num_queries=7),
        ),
        (96, 128),
    ),
    "wider, portrait": (
        FCCLIPConfig(
            clip=ClipConfig(
                depths=(2, 1, 3, 1), dims=(32, 64, 96, 192), embed_dim=64, text_width=32, text_layers=1, text_heads=2
            ),
            pixel_decoder=PixelDecoderConfig(
                conv_dim=64, mask_dim=96, encoder_layers=3, encoder_heads=4, encoder_points=3, encoder_ffn_dim=128
            ),
            decoder=DecoderConfig(hidden_dim=64, heads=8, ffn_dim=96, layers=2, num_queries=13),
        ),
        (160, 96),
    ),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_image_part_matches_float64_reference(name):
    """Catches wiring that only happens to be right at the fixtures' sizes."""
    cfg, size = ARCHITECTURES[name]
    model = seeded_init_(FCCLIP(cfg), seed=3).eval()
    images = torch.from_numpy(np.random.default_rng(4).standard_normal((1, 3, *size), np.float32))
    with torch.no_grad():
        ours = model.image_embeddings(images)
    ref = reference_image_part(images, model.state_dict(), cfg)
    q = cfg.decoder.num_queries
    assert ours["pred_masks"].shape == (1, q, size[0] // 4, size[1] // 4)
    assert ours["class_embed"].shape == ours["ov_embed"].shape == (1, q, cfg.clip.embed_dim)
    for key in ("clip_vis_dense", "pred_masks", "class_embed", "ov_embed"):
        assert rel(ours[key], ref[key].numpy()) <= 1e-4, key
