"""FC-CLIP, with the module tree of the official checkpoint (``backbone.clip_model.*``,
``sem_seg_head.pixel_decoder.*``, ``sem_seg_head.predictor.*``, ``void_embedding``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from knnclip.export.fcclip.clip_text import ClipText
from knnclip.export.fcclip.clip_visual import ClipVisual
from knnclip.export.fcclip.config import FCCLIPConfig
from knnclip.export.fcclip.decoder import TransformerDecoder, classification_logits, mask_pool
from knnclip.export.fcclip.pixel_decoder import PixelDecoder


class ClipModel(ClipText):
    def __init__(self, cfg: FCCLIPConfig) -> None:
        super().__init__(cfg.clip)
        self.visual = ClipVisual(cfg.clip)


class Backbone(nn.Module):
    def __init__(self, cfg: FCCLIPConfig) -> None:
        super().__init__()
        self.clip_model = ClipModel(cfg)


class SemSegHead(nn.Module):
    def __init__(self, cfg: FCCLIPConfig) -> None:
        super().__init__()
        channels = (cfg.clip.dims[0], *cfg.clip.dims[1:])
        self.pixel_decoder = PixelDecoder(cfg.pixel_decoder, channels)
        self.predictor = TransformerDecoder(cfg.decoder, cfg.pixel_decoder.mask_dim, cfg.clip.embed_dim)


class FCCLIP(nn.Module):
    """The whole model. :meth:`forward_image` runs the image part on a normalised, padded batch
    against a text classifier; :meth:`text_classifier` builds that classifier from token ids."""

    def __init__(self, config: FCCLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.sem_seg_head = SemSegHead(config)
        self.void_embedding = nn.Embedding(1, config.clip.embed_dim)

    @property
    def clip(self) -> ClipModel:
        return self.backbone.clip_model

    def classifier_with_void(self, text_classifier: Tensor) -> Tensor:
        """Append the normalised void embedding as the last row."""
        return torch.cat([text_classifier, F.normalize(self.void_embedding.weight, dim=-1)], dim=0)

    def forward_image(self, images: Tensor, text_classifier: Tensor, num_templates: list[int]) -> dict[str, Tensor]:
        """``images`` [B, 3, H, W] normalised and padded to a multiple of 32; ``text_classifier``
        [sum(num_templates) + 1, E] with void last. Returns every stage's output: backbone features,
        mask features, multi-scale features, in-vocabulary logits and masks (+ auxiliary), the
        mask-pooled CLIP features, their embeddings and out-of-vocabulary logits."""
        out = self.image_embeddings(images, with_stages=True)
        predictor = self.sem_seg_head.predictor
        return {
            **out,
            "pred_logits": predictor.logits(out["class_embed"], text_classifier, num_templates),
            "aux_pred_logits": torch.stack(
                [predictor.logits(c, text_classifier, num_templates) for c in out["aux_class_embed"]]
            ),
            "ov_logits": classification_logits(out["ov_embed"], text_classifier, self.clip.logit_scale, num_templates),
        }

    def image_embeddings(self, images: Tensor, with_stages: bool = False) -> dict[str, Tensor]:
        """The vocabulary-free image part: ``pred_masks`` [B, Q, H/4, W/4] mask logits, ``class_embed``
        [B, Q, E] (in-vocabulary branch), ``ov_embed`` [B, Q, E] (mask-pooled CLIP features projected
        into CLIP space) and ``clip_vis_dense`` [B, C, H/32, W/32]. ``with_stages`` adds every
        intermediate (backbone, pixel decoder, auxiliary predictions, pooled features)."""
        feats = self.clip.visual.features(images)
        mask_features, multi_scale = self.sem_seg_head.pixel_decoder(
            [feats["res2"], feats["res3"], feats["res4"], feats["res5"]]
        )
        class_embed, masks, aux = self.sem_seg_head.predictor(multi_scale, mask_features)
        dense = feats["clip_vis_dense"]
        mask_for_pooling = F.interpolate(masks, size=dense.shape[-2:], mode="bilinear", align_corners=False)
        pooled = mask_pool(dense, mask_for_pooling)
        out = {
            "pred_masks": masks,
            "class_embed": class_embed,
            "ov_embed": self.clip.visual.project_pooled(pooled),
            "clip_vis_dense": dense,
        }
        if with_stages:
            out |= {
                **feats,
                "mask_features": mask_features,
                **{f"multi_scale_feature_{i}": m for i, m in enumerate(multi_scale)},
                "aux_class_embed": [c for c, _ in aux],
                "aux_pred_masks": torch.stack([m for _, m in aux]),
                "ov_pooled_clip_feature": pooled,
            }
        return out
