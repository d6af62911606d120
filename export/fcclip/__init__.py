"""FC-CLIP, the base open-vocabulary segmenter: ConvNeXt CLIP image and text towers, the
MSDeformAttn pixel decoder, the masked-attention decoder, and FC-CLIP's test-time inference.

>>> from knnclip.export.fcclip import load_fcclip          # doctest: +SKIP
>>> model = load_fcclip("fcclip_cocopan.pth")              # doctest: +SKIP
"""

from knnclip.export.fcclip.checkpoint import describe_checkpoint, load_clip, load_fcclip
from knnclip.export.fcclip.config import FCCLIPConfig, config_from_dict, resolve_config
from knnclip.export.fcclip.model import FCCLIP, ClipModel

__all__ = [
    "FCCLIP",
    "ClipModel",
    "FCCLIPConfig",
    "config_from_dict",
    "describe_checkpoint",
    "load_clip",
    "load_fcclip",
    "resolve_config",
]
