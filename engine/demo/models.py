"""The demo's models: reduced FC-CLIP and DINOv2 with seeded random weights, small enough to
export and run on a CPU in seconds. ``knnclip demo`` exports them, and ``knnclip bench
--preset tiny`` and the tests build the same ones."""

from __future__ import annotations

from typing import Any

from knnclip.engine.demo.synthetic import IMAGE_SIZE

DINOV2_SIZE = 224  # the seeded DINOv2's input size (16 x 16 patches of 14)


def seeded_fcclip() -> Any:
    from knnclip.export.fcclip import FCCLIP, FCCLIPConfig
    from knnclip.export.fcclip.config import ClipConfig, DecoderConfig, InferenceConfig, PixelDecoderConfig
    from knnclip.export.random_init import seeded_init_

    cfg = FCCLIPConfig(
        clip=ClipConfig(
            depths=(1, 1, 2, 1), dims=(32, 64, 128, 256), embed_dim=64, text_width=64, text_layers=2, text_heads=4
        ),
        pixel_decoder=PixelDecoderConfig(
            conv_dim=64, mask_dim=64, encoder_layers=1, encoder_heads=4, encoder_ffn_dim=128
        ),
        decoder=DecoderConfig(hidden_dim=64, heads=4, ffn_dim=128, layers=3, num_queries=50),
        inference=InferenceConfig(min_size_test=IMAGE_SIZE[0]),
    )
    return seeded_init_(FCCLIP(cfg), seed=1).eval()


def seeded_dinov2() -> Any:
    from knnclip.export.dinov2 import DinoV2, DinoV2Config
    from knnclip.export.random_init import seeded_init_

    cfg = DinoV2Config(
        embed_dim=96,
        depth=3,
        num_heads=4,
        ffn_layer="mlp",
        num_register_tokens=4,
        img_size=DINOV2_SIZE,
        init_values=1.0,
    )
    return seeded_init_(DinoV2(cfg), seed=2).eval()
