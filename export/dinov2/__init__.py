"""DINOv2 ViT feature extractor: the last block's attention keys, the map kNN-CLIP pools into
mask embeddings.

>>> from knnclip.export.dinov2 import load_dinov2        # doctest: +SKIP
>>> model = load_dinov2("dinov2_vitg14_reg4_pretrain.pth")  # doctest: +SKIP
>>> model(images).shape                                   # doctest: +SKIP
torch.Size([1, 1536, 37, 37])
"""

from knnclip.export.dinov2.checkpoint import check_state_dict, hf_to_official, load_dinov2, read_state_dict
from knnclip.export.dinov2.config import DEFAULT_PRESET, PRESETS, DinoV2Config, config_from_dict, resolve_config
from knnclip.export.dinov2.hub import HF_REPOS, download_dinov2
from knnclip.export.dinov2.model import DinoV2

__all__ = [
    "DEFAULT_PRESET",
    "HF_REPOS",
    "PRESETS",
    "DinoV2",
    "DinoV2Config",
    "check_state_dict",
    "config_from_dict",
    "download_dinov2",
    "hf_to_official",
    "load_dinov2",
    "read_state_dict",
    "resolve_config",
]
