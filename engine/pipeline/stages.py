"""The stages of kNN-CLIP inference as public functions: the segmenter composes them, and the
sweep, the benchmark and the evaluation reuse them.

Data flows one way::

    pixels --preprocess--> model inputs --propose--> Proposal (masks, P_base, query embeddings)
           --retrieve--> neighbours (sims, labels) --fuse--> Fusion (P_ret, fused, mask_cls)
           --decide--> Result (semantic map, panoptic segments, evidence)

Shapes: Q queries, C classes, k neighbours; masks are FC-CLIP's stride-4 logits over the padded
input.

Every stage takes ``xp`` (:mod:`knnclip.engine.pipeline.arrays`): NumPy on the host by default,
or torch on a GPU, where the models' outputs stay until the results leave (the image's tensors
go in, the label maps, segment table, instances and evidence come out).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from knnclip.engine.backends import Session
from knnclip.engine.config import RetrievalConfig
from knnclip.engine.database import Database
from knnclip.engine.errors import OutOfMemoryError
from knnclip.engine.pipeline import postprocess
from knnclip.engine.pipeline.arrays import HOST, Array, ArrayModule
from knnclip.engine.pipeline.classifier import Classifier
from knnclip.engine.pipeline.models import FCCLIPHead, ModelSet
from knnclip.engine.pipeline.preprocess import FCCLIPInput, dinov2_input, fcclip_input
from knnclip.engine.pipeline.results import Evidence, InstanceMask, PanopticSegment, Result
from knnclip.engine.pipeline.search import DeviceScan, search_neighbours
from knnclip.engine.pipeline.timing import Timer

MASK_STRIDE = 4  # FC-CLIP's mask logits are at a quarter of the padded input's resolution


@dataclass
class Proposal:
    """One image's model outputs before retrieval (what a sweep over retrieval settings reuses)."""

    x: FCCLIPInput
    masks: Array  # [Q, h, w] mask logits over the padded input at stride 4
    base: postprocess.ClassProbabilities
    queries: Array  # [Q, D] pooled DINOv2 keys
    classifier: Classifier
    xp: ArrayModule = HOST  # where the arrays above live
    _image_masks: postprocess.ImageMasks | None = None

    def image_masks(self) -> postprocess.ImageMasks:
        """The mask logits at the image's size: resized once where they fit the memory budget,
        band by band otherwise (``postprocess.FULL_MASKS_BUDGET``)."""
        if self._image_masks is None:
            x = self.x
            self._image_masks = postprocess.ImageMasks(self.masks, x.padded, x.resized, x.original, xp=self.xp)
        return self._image_masks


@dataclass(frozen=True)
class Fusion:
    index: Array  # [Q, k] neighbour class indices (-1: none)
    sims: Array  # [Q, k] similarities (0 where no neighbour)
    p_ret: Array  # [Q, C]
    fused: Array  # [Q, C]
    mask_cls: Array  # [Q, C + 1] log-probabilities with void


@dataclass(frozen=True)
class ClassifierTables:
    """A classifier's arrays on ``xp``'s device, uploaded once per vocabulary and device."""

    rows: Array  # [S + 1, E]
    lut: Array  # database class id + 1 -> class index
    ids: Array  # [C] database class ids


def classifier_tables(classifier: Classifier, xp: ArrayModule) -> ClassifierTables:
    key = classifier.key
    return ClassifierTables(
        rows=xp.constant(("classifier_rows", key), lambda: classifier.rows),
        lut=xp.constant(("class_lut", key), lambda: classifier.lut),
        ids=xp.constant(("class_ids", key), lambda: classifier.ids),
    )


def infer(session: Session, feed: dict[str, np.ndarray], xp: ArrayModule) -> dict[str, Array]:
    """A model call where ``xp`` keeps its arrays: host in and out, or the inputs uploaded (the
    image) and the outputs left on the device (``Session.infer_device``)."""
    if xp.on_host:
        return session.infer(feed)
    inputs = {name: xp.upload(value, "image") for name, value in feed.items()}
    # A runtime reads its inputs on a stream of its own, which torch's CUDA array interface (v2,
    # no stream) cannot order: the uploads are finished first.
    xp.synchronize()
    outputs = session.infer_device(inputs)
    return {name: xp.adopt(value) for name, value in outputs.items()}


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


def valid_masks(masks: Array, resized: tuple[int, int], xp: ArrayModule = HOST) -> Array:
    """The part of stride-4 mask logits [..., h, w] that covers the unpadded image (DINOv2 saw
    the unpadded image only), C-contiguous."""
    rows, cols = valid_mask_extent(resized)
    return xp.contiguous(masks[..., :rows, :cols])


# Embed ------------------------------------------------------------------------------------------
def dinov2_keys(models: ModelSet, images: Sequence[np.ndarray], *, xp: ArrayModule = HOST) -> Array:
    """DINOv2 keys [B, D, h, w] of uint8 images, all through the model in one call."""
    size, mean, std = models.dinov2_size, models.dinov2_mean, models.dinov2_std  # from DINOv2's manifest
    batch = np.concatenate([dinov2_input(pixels, size, mean, std) for pixels in images])
    return infer(models.dinov2, {"images": batch}, xp)["keys"]


def classify(
    head: FCCLIPHead,
    classifier: Classifier,
    class_embed: Array,
    ov_embed: Array,
    *,
    xp: ArrayModule = HOST,
) -> postprocess.ClassProbabilities:
    """P_base: in-vocabulary and CLIP (out-of-vocabulary) classification, FC-CLIP's ensemble."""
    per_class = classifier.synonyms_per_class
    rows = classifier_tables(classifier, xp).rows
    weights = xp.constant(
        ("ensemble_weights", classifier.key, head.alpha, head.beta),
        lambda: postprocess.ensemble_weights(classifier.seen, head.alpha, head.beta),
    )
    in_vocab = postprocess.classification_logits(class_embed, rows, head.in_vocab_logit_scale, per_class, xp=xp)
    ov = postprocess.classification_logits(ov_embed, rows, head.clip_logit_scale, per_class, xp=xp)
    return postprocess.geometric_ensemble(in_vocab, ov, classifier.seen, head.alpha, head.beta, xp=xp, weights=weights)


# Propose ----------------------------------------------------------------------------------------
def _fcclip_by_shape(models: ModelSet, tensors: list[np.ndarray], xp: ArrayModule) -> dict[str, list[Array]]:
    """FC-CLIP's outputs per image, one model call per group of equally sized inputs (a graph
    with dynamic spatial axes gets images of several sizes in one batch)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.shape, []).append(i)
    out: dict[str, list[Any]] = {}
    for members in groups.values():
        result = infer(models.fcclip, {"images": np.concatenate([tensors[i] for i in members])}, xp)
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
    *,
    xp: ArrayModule = HOST,
) -> list[Proposal]:
    """Everything before the database, for several images: FC-CLIP once per group of equally
    sized inputs (one group for a fixed-size graph), DINOv2 once (every input is its square).
    The batch stages go to ``timer``; the per-image ones (classify, pool) to ``per_image[i]``
    when given, else to ``timer``."""
    with timer.stage("preprocess"):
        xs = [fcclip_input_for(models, pixels) for pixels in images]
    with timer.stage("fcclip"):
        out = _fcclip_by_shape(models, [x.tensor for x in xs], xp)
    with timer.stage("dinov2"):
        keys = dinov2_keys(models, images, xp=xp)
    proposals = []
    for i, x in enumerate(xs):
        own = per_image[i] if per_image is not None else timer
        masks = out["mask_logits"][i]
        with own.stage("classify"):
            base = classify(models.head, classifier, out["class_embed"][i], out["ov_embed"][i], xp=xp)
        with own.stage("pool"):
            queries = xp.mask_pool(xp.contiguous(keys[i]), valid_masks(masks, x.resized, xp), mask_threshold)
        proposals.append(Proposal(x, masks, base, queries, classifier, xp))
    return proposals


# Retrieve ---------------------------------------------------------------------------------------
def retrieve(
    database: Database, queries: Array, k: int, *, xp: ArrayModule = HOST, scan: DeviceScan | None = None
) -> tuple[Array, Array]:
    """The ``k`` nearest database entries of each query: (similarities [Q, k], class ids [Q, k],
    -1 where there is no neighbour), where the queries are (``search.search_neighbours``)."""
    return search_neighbours(database, queries, k, xp=xp, scan=scan)


# Fuse -------------------------------------------------------------------------------------------
def fuse(p: Proposal, sims: Array, labels: Array, cfg: RetrievalConfig) -> Fusion:
    """Neighbours to P_ret, and its fusion where retrieval is confident (``cfg.fusion`` says where:
    into FC-CLIP's out-of-vocabulary branch before its ensemble, or into the ensembled P_base)."""
    classifier, xp = p.classifier, p.xp
    lut = classifier_tables(classifier, xp).lut
    # The classifier is the vocabulary this call started with: a neighbour of a class added since
    # (an id past the table) or removed since (-1 in it) is no evidence for this call.
    known = (labels >= 0) & (labels < len(classifier.lut) - 1)
    index = xp.take(lut, xp.where(known, labels, -1) + 1)
    sims = xp.astype(xp.where(index >= 0, sims, 0.0), "float32")
    p_ret = xp.retrieval_probs(xp.contiguous(sims), xp.contiguous(index), len(classifier.classes), cfg.tau)
    fused = postprocess.fuse_retrieval(p.base, p_ret, cfg.T, cfg.lam, cfg.fusion, xp=xp)
    mask_cls = postprocess.ClassProbabilities(fused, p.base.void).mask_cls(xp)
    return Fusion(index, sims, p_ret, fused, mask_cls)


# Decide -----------------------------------------------------------------------------------------
def semantic_map(p: Proposal, mask_cls: Array) -> Array:
    """[H, W] database class ids: FC-CLIP's semantic inference on the image-sized masks (on the
    proposal's device)."""
    xp = p.xp
    labels = postprocess.semantic_labels(postprocess.semantic_probs(mask_cls, xp=xp), p.image_masks(), xp=xp)
    return xp.take(classifier_tables(p.classifier, xp).ids, labels)


@contextmanager
def _memory_named(p: Proposal) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        if not (isinstance(exc, MemoryError) or p.xp.out_of_memory(exc)):
            raise
        h, w = p.x.original
        where = "" if p.xp.on_host else f" on {p.xp.device}"
        raise OutOfMemoryError(
            f"a {w}x{h} image needs more memory than is free{where} for its post-processing (about 32 bytes "
            f"per pixel plus {postprocess.FULL_MASKS_BUDGET >> 20} MiB); downscale it or lower "
            "KNNCLIP_MAX_IMAGE_PIXELS so such images are refused when decoded (or KNNCLIP_MASK_BUDGET_BYTES)"
        ) from None


def _evidence_arrays(p: Proposal, fusion: Fusion) -> dict[str, np.ndarray]:
    """Per query, on the host: FC-CLIP's and retrieval's best class, retrieval's confidence,
    whether fusion changed the class, and the neighbours (class index, similarity)."""
    xp = p.xp
    base_top = xp.argmax(p.base.classes, axis=-1)
    on_device = {
        "base_top": base_top,
        "ret_top": xp.argmax(fusion.p_ret, axis=-1),
        "ret_conf": xp.amax(fusion.p_ret, axis=-1),
        "changed": xp.argmax(fusion.fused, axis=-1) != base_top,
        "index": fusion.index,
        "sims": fusion.sims,
    }
    return {name: xp.to_host(value, "result") for name, value in on_device.items()}


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
    classifier, xp = p.classifier, p.xp
    with timer.stage("fuse"):
        fusion = fuse(p, sims, labels, cfg)
    with timer.stage("postprocess"), _memory_named(p):
        semantic = xp.to_host(semantic_map(p, fusion.mask_cls), "result")
        if panoptic:
            thresholds = head.object_mask_threshold, head.overlap_threshold
            panoptic_map, segs = postprocess.panoptic_inference(
                fusion.mask_cls, p.image_masks(), classifier.is_thing, *thresholds, xp=xp
            )
            panoptic_map = xp.to_host(panoptic_map, "result")
        else:
            panoptic_map, segs = np.zeros(semantic.shape, np.int32), []
        found = (
            postprocess.instance_inference(fusion.mask_cls, p.image_masks(), classifier.is_thing, xp=xp)
            if instance
            else []
        )
        evidence_of = _evidence_arrays(p, fusion)
    ids, names = classifier.ids, classifier.names
    base_top, ret_top, ret_conf, changed = (evidence_of[k] for k in ("base_top", "ret_top", "ret_conf", "changed"))
    fusion_index, fusion_sims = evidence_of["index"], evidence_of["sims"]

    def evidence(q: int) -> Evidence:
        neighbours = tuple((names[i], float(v)) for i, v in zip(fusion_index[q], fusion_sims[q], strict=True) if i >= 0)
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
