"""FC-CLIP's test-time classification and post-processing, exactly as the official ``FCCLIP``:
text classifier averaging, the geometric ensemble of in- and out-of-vocabulary probabilities
with void handling, mask resizing back to the image, semantic and panoptic inference."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

NUM_TEMPLATES = 14


def text_classifier(per_template: Tensor, templates: int = NUM_TEMPLATES) -> Tensor:
    """[synonyms * templates, E] text features (synonym-major) -> [synonyms, E]: L2-normalise,
    mean over templates, L2-normalise."""
    x = per_template / per_template.norm(dim=-1, keepdim=True)
    x = x.reshape(-1, templates, x.shape[-1]).mean(1)
    return x / x.norm(dim=-1, keepdim=True)


def ensemble(in_vocab_logits: Tensor, out_vocab_logits: Tensor, seen: Tensor, alpha: float, beta: float) -> Tensor:
    """Geometric ensemble -> log class probabilities [..., classes + 1] with void last.

    ``in_vocab_logits``/``out_vocab_logits`` [..., classes + 1] (void last); ``seen`` [classes]
    is 1 where the class (one of its synonyms) was in the training vocabulary. The class
    distribution ``softmax(p_in^(1-w) p_out^w)`` (w = alpha seen, beta unseen) is scaled by
    ``1 - p_void`` from the in-vocabulary softmax, p_void appended, then ``log(p + 1e-8)``."""
    p_in = in_vocab_logits[..., :-1].softmax(-1)
    p_out = out_vocab_logits[..., :-1].softmax(-1)
    seen = seen.to(p_in.dtype)
    logits_seen = (p_in ** (1 - alpha) * p_out**alpha).log() * seen
    logits_unseen = (p_in ** (1 - beta) * p_out**beta).log() * (1 - seen)
    cls = logits_seen + logits_unseen
    p_void = F.softmax(in_vocab_logits, dim=-1)[..., -1:]
    probs = torch.cat([cls.softmax(-1) * (1.0 - p_void), p_void], dim=-1)
    return torch.log(probs + 1e-8)


def resize_masks(masks: Tensor, padded: tuple[int, int], image: tuple[int, int], output: tuple[int, int]) -> Tensor:
    """[Q, h, w] mask logits at stride 4 -> upsample to the ``padded`` input size, crop the ``image``
    (unpadded) size, resize to ``output`` (detectron2 ``sem_seg_postprocess``); all bilinear,
    align_corners=False."""
    x = F.interpolate(masks[None], size=padded, mode="bilinear", align_corners=False)
    x = x[:, :, : image[0], : image[1]]
    return F.interpolate(x, size=output, mode="bilinear", align_corners=False)[0]


def semantic_inference(mask_cls: Tensor, mask_pred: Tensor) -> Tensor:
    """[Q, C+1] log-probs, [Q, H, W] mask logits -> [C, H, W] = sum_q softmax(cls)[:C] * sigmoid(mask)."""
    return torch.einsum("qc,qhw->chw", F.softmax(mask_cls, dim=-1)[..., :-1], mask_pred.sigmoid())


@dataclass(frozen=True)
class Segment:
    id: int
    category_id: int
    isthing: bool


def panoptic_inference(
    mask_cls: Tensor,
    mask_pred: Tensor,
    is_thing: list[bool],
    object_mask_threshold: float = 0.0,
    overlap_threshold: float = 0.8,
) -> tuple[Tensor, list[Segment]]:
    """Mask2Former/FC-CLIP panoptic inference -> (segment id map [H, W] int32, 0 = void; segments).

    Queries whose best class is void, or whose score is not above ``object_mask_threshold``, are
    dropped; each pixel goes to the query with the highest score x sigmoid(mask); a query keeps its
    pixels where its own mask is >= 0.5 and at least ``overlap_threshold`` of them survived;
    stuff classes merge into one segment per class."""
    num_classes = mask_cls.shape[-1] - 1
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    masks = mask_pred.sigmoid()
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], masks[keep]
    height, width = masks.shape[-2:]
    panoptic = torch.zeros((height, width), dtype=torch.int32, device=masks.device)
    segments: list[Segment] = []
    if cur_masks.shape[0] == 0:
        return panoptic, segments
    owner = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    stuff_ids: dict[int, int] = {}
    next_id = 0
    for k in range(cur_classes.shape[0]):
        cls = int(cur_classes[k])
        thing = bool(is_thing[cls])
        area = int((owner == k).sum())
        original = int((cur_masks[k] >= 0.5).sum())
        region = (owner == k) & (cur_masks[k] >= 0.5)
        if area > 0 and original > 0 and int(region.sum()) > 0:
            if area / original < overlap_threshold:
                continue
            if not thing:
                if cls in stuff_ids:
                    panoptic[region] = stuff_ids[cls]
                    continue
                stuff_ids[cls] = next_id + 1
            next_id += 1
            panoptic[region] = next_id
            segments.append(Segment(next_id, cls, thing))
    return panoptic, segments
