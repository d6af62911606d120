"""The stages of kNN-CLIP inference as public functions: the segmenter composes them, and the
sweep, the benchmark and the evaluation reuse them.

Data flows one way::

    pixels --preprocess--> model inputs --propose--> Proposal (masks, P_base, query embeddings)
           --retrieve--> neighbours (sims, labels) --fuse--> Fusion (P_ret, fused, mask_cls)
           --decide--> Result (semantic map, panoptic segments, evidence)

Shapes: Q queries, C classes, k neighbours; masks are FC-CLIP's stride-4 logits over the padded
input.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from knnclip.engine import ops
from knnclip.engine.config import RetrievalConfig
from knnclip.engine.database import Database
from knnclip.engine.errors import OutOfMemoryError
from knnclip.engine.pipeline import postprocess
from knnclip.engine.pipeline.classifier import Classifier
from knnclip.engine.pipeline.models import FCCLIPHead, ModelSet
from knnclip.engine.pipeline.preprocess import FCCLIPInput, dinov2_input, fcclip_input
from knnclip.engine.pipeline.results import Evidence, InstanceMask, PanopticSegment, Result
from knnclip.engine.pipeline.timing import Timer

MASK_STRIDE = 4  # FC-CLIP's mask logits are at a quarter of the padded input's resolution


@dataclass
class Proposal:
    """One image's model outputs before retrieval (what a sweep over retrieval settings reuses)."""

    x: FCCLIPInput
    masks: np.ndarray  # [Q, h, w] mask logits over the padded input at stride 4
    base: postprocess.ClassProbabilities
    queries: np.ndarray  # [Q, D] pooled DINOv2 keys
    classifier: Classifier
    _image_masks: postprocess.ImageMasks | None = None

    def image_masks(self) -> postprocess.ImageMasks:
        """The mask logits at the image's size: resized once where they fit the memory budget,
        band by band otherwise (``postprocess.FULL_MASKS_BUDGET``)."""
        if self._image_masks is None:
            self._image_masks = postprocess.ImageMasks(self.masks, self.x.padded, self.x.resized, self.x.original)
        return self._image_masks


@dataclass(frozen=True)
class Fusion:
    index: np.ndarray  # [Q, k] neighbour class indices (-1: none)
    sims: np.ndarray  # [Q, k] similarities (0 where no neighbour)
    p_ret: np.ndarray  # [Q, C]
    fused: np.ndarray  # [Q, C]
    mask_cls: np.ndarray  # [Q, C + 1] log-probabilities with void


# Preprocess -------------------------------------------------------------------------------------
def fcclip_input_for(models: ModelSet, pixels: np.ndarray) -> FCCLIPInput:
    """FC-CLIP's test-time input for ``pixels`` (uint8 [H, W, 3]): resized to its official test size
    and padded to 32 for a graph with dynamic spatial axes, fitted into a fixed graph's size."""
    head = models.head
    return fcclip_input(
        pixels, head.pixel_mean, head.pixel_std, short=head.min_size, max_size=head.max_size, pad_to=models.fcclip_size
    )


def valid_mask_extent(resized: tuple[int, int]) -> tuple[int, int]:
    """How many rows and columns of the stride-4 mask logits cover the unpadded ``resized`` image.

    >>> valid_mask_extent((381, 512))
    (96, 128)
    """
    return -(-resized[0] // MASK_STRIDE), -(-resized[1] // MASK_STRIDE)


def valid_masks(masks: np.ndarray, resized: tuple[int, int]) -> np.ndarray:
    """The part of stride-4 mask logits [..., h, w] that covers the unpadded image (DINOv2 saw
    the unpadded image only), C-contiguous."""
    rows, cols = valid_mask_extent(resized)
    return np.ascontiguousarray(masks[..., :rows, :cols])


# Embed ------------------------------------------------------------------------------------------
def dinov2_keys(models: ModelSet, images: Sequence[np.ndarray]) -> np.ndarray:
    """DINOv2 keys [B, D, h, w] of uint8 images, all through the model in one call."""
    batch = np.concatenate([dinov2_input(pixels, models.dinov2_size) for pixels in images])
    return models.dinov2.infer({"images": batch})["keys"]


def classify(
    head: FCCLIPHead, classifier: Classifier, class_embed: np.ndarray, ov_embed: np.ndarray
) -> postprocess.ClassProbabilities:
    """P_base: in-vocabulary and CLIP (out-of-vocabulary) classification, FC-CLIP's ensemble."""
    per_class = classifier.synonyms_per_class
    in_vocab = postprocess.classification_logits(class_embed, classifier.rows, head.in_vocab_logit_scale, per_class)
    ov = postprocess.classification_logits(ov_embed, classifier.rows, head.clip_logit_scale, per_class)
    return postprocess.geometric_ensemble(in_vocab, ov, classifier.seen, head.alpha, head.beta)


# Propose ----------------------------------------------------------------------------------------
def _fcclip_by_shape(models: ModelSet, tensors: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
    """FC-CLIP's outputs per image, one model call per group of equally sized inputs (a graph
    with dynamic spatial axes gets images of several sizes in one batch)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.shape, []).append(i)
    out: dict[str, list[Any]] = {}
    for members in groups.values():
        result = models.fcclip.infer({"images": np.concatenate([tensors[i] for i in members])})
        for name, value in result.items():
            slots = out.setdefault(name, [None] * len(tensors))
            for row, i in enumerate(members):
                slots[i] = value[row]
    return out


def propose(
    models: ModelSet,
    classifier: Classifier,
    images: Sequence[np.ndarray],
    mask_threshold: float,
    timer: Timer,
    per_image: Sequence[Timer] | None = None,
) -> list[Proposal]:
    """Everything before the database, for several images: FC-CLIP once per group of equally
    sized inputs (one group for a fixed-size graph), DINOv2 once (every input is its square).
    The batch stages go to ``timer``; the per-image ones (classify, pool) to ``per_image[i]``
    when given, else to ``timer``."""
    with timer.stage("preprocess"):
        xs = [fcclip_input_for(models, pixels) for pixels in images]
    with timer.stage("fcclip"):
        out = _fcclip_by_shape(models, [x.tensor for x in xs])
    with timer.stage("dinov2"):
        keys = dinov2_keys(models, images)
    proposals = []
    for i, x in enumerate(xs):
        own = per_image[i] if per_image is not None else timer
        masks = out["mask_logits"][i]
        with own.stage("classify"):
            base = classify(models.head, classifier, out["class_embed"][i], out["ov_embed"][i])
        with own.stage("pool"):
            queries = ops.mask_pool(np.ascontiguousarray(keys[i]), valid_masks(masks, x.resized), mask_threshold)
        proposals.append(Proposal(x, masks, base, queries, classifier))
    return proposals


# Retrieve ---------------------------------------------------------------------------------------
def retrieve(database: Database, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest database entries of each query: (similarities [Q, k], class ids [Q, k],
    -1 where there is no neighbour)."""
    sims, labels, _ = database.search(queries, k)
    return sims, labels


# Fuse -------------------------------------------------------------------------------------------
def fuse(p: Proposal, sims: np.ndarray, labels: np.ndarray, cfg: RetrievalConfig) -> Fusion:
    """Neighbours to P_ret, and its fusion where retrieval is confident (``cfg.fusion`` says where:
    into FC-CLIP's out-of-vocabulary branch before its ensemble, or into the ensembled P_base)."""
    classifier = p.classifier
    # The classifier is the vocabulary this call started with: a neighbour of a class added since
    # (an id past the table) or removed since (-1 in it) is no evidence for this call.
    known = (labels >= 0) & (labels < len(classifier.lut) - 1)
    index = classifier.lut[np.where(known, labels, -1) + 1]
    sims = np.where(index >= 0, sims, 0.0).astype(np.float32)
    p_ret = ops.retrieval_probs(sims, index, len(classifier.classes), cfg.tau)
    fused = postprocess.fuse_retrieval(p.base, p_ret, cfg.T, cfg.lam, cfg.fusion)
    mask_cls = postprocess.ClassProbabilities(fused, p.base.void).mask_cls()
    return Fusion(index, sims, p_ret, fused, mask_cls)


# Decide -----------------------------------------------------------------------------------------
def semantic_map(p: Proposal, mask_cls: np.ndarray) -> np.ndarray:
    """[H, W] database class ids: FC-CLIP's semantic inference on the image-sized masks."""
    labels = postprocess.semantic_labels(postprocess.semantic_probs(mask_cls), p.image_masks())
    return p.classifier.ids[labels]


@contextmanager
def _memory_named(p: Proposal) -> Iterator[None]:
    try:
        yield
    except MemoryError:
        h, w = p.x.original
        raise OutOfMemoryError(
            f"a {w}x{h} image needs more memory than is free for its post-processing (about 32 bytes per "
            f"pixel plus {postprocess.FULL_MASKS_BUDGET >> 20} MiB); downscale it or lower "
            "KNNCLIP_MAX_IMAGE_PIXELS so such images are refused when decoded"
        ) from None


def decide(
    head: FCCLIPHead,
    p: Proposal,
    sims: np.ndarray,
    labels: np.ndarray,
    cfg: RetrievalConfig,
    timer: Timer,
    *,
    panoptic: bool = True,
    instance: bool = False,
) -> Result:
    """Fusion, then FC-CLIP's semantic and (unless ``panoptic=False``) panoptic inference, with
    the retrieval evidence of every segment, and (with ``instance=True``) its instance inference.

    Memory: the mask budget of ``postprocess`` plus about 32 bytes per image pixel, whatever the
    number of queries; running out of it is an ``OutOfMemoryError`` naming the image size, not a
    crash of the whole batch."""
    classifier = p.classifier
    with timer.stage("fuse"):
        fusion = fuse(p, sims, labels, cfg)
    with timer.stage("postprocess"), _memory_named(p):
        semantic = semantic_map(p, fusion.mask_cls)
        if panoptic:
            thresholds = head.object_mask_threshold, head.overlap_threshold
            panoptic_map, segs = postprocess.panoptic_inference(
                fusion.mask_cls, p.image_masks(), classifier.is_thing, *thresholds
            )
        else:
            panoptic_map, segs = np.zeros(semantic.shape, np.int32), []
        found = (
            postprocess.instance_inference(fusion.mask_cls, p.image_masks(), classifier.is_thing) if instance else []
        )
    ids, names = classifier.ids, classifier.names
    base_top = p.base.classes.argmax(-1)
    ret_top = fusion.p_ret.argmax(-1)
    ret_conf = fusion.p_ret.max(-1)
    changed = fusion.fused.argmax(-1) != base_top

    def evidence(q: int) -> Evidence:
        neighbours = tuple((names[i], float(v)) for i, v in zip(fusion.index[q], fusion.sims[q], strict=True) if i >= 0)
        retrieved = names[ret_top[q]] if ret_conf[q] > 0 else None
        return Evidence(names[base_top[q]], retrieved, float(ret_conf[q]), neighbours, bool(changed[q]))

    segments = [
        PanopticSegment(
            s.id, int(ids[s.category_id]), names[s.category_id], s.score, s.area, s.isthing, evidence(s.query)
        )
        for s in segs
    ]
    instances = [InstanceMask(int(ids[i.category_id]), names[i.category_id], i.score, i.mask) for i in found]
    classes = {c.id: c.name for c in classifier.classes}
    return Result(semantic, panoptic_map, segments, classes, instances=instances)
