"""Growing the database: labelled masks and unlabelled concept images become DINOv2 mask
embeddings stored with their class. Nothing is retrained; only embeddings are added."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from knnclip.engine import ops
from knnclip.engine.database import Database
from knnclip.engine.database.vocabulary import ClassInfo
from knnclip.engine.errors import InvalidInputError
from knnclip.engine.pipeline.classifier import build_classifier
from knnclip.engine.pipeline.models import ModelSet
from knnclip.engine.pipeline.preprocess import ImageInput, load_image
from knnclip.engine.pipeline.stages import classify, dinov2_keys, fcclip_input_for, valid_masks
from knnclip.engine.text.textbank import TextBank

log = logging.getLogger("knnclip.growth")
POOL_CHUNK_BYTES = 64 << 20  # float32 mask logits made at once while pooling examples


def embed_masks(models: ModelSet, image: ImageInput, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DINOv2 mask embeddings of ground-truth ``masks`` [N, H, W] (bool, the image's size):
    (embeddings [M, D] for the masks that survive at the keys' resolution, their indices)."""
    pixels = load_image(image)
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3 or masks.shape[1:] != pixels.shape[:2]:
        raise InvalidInputError(f"masks must be [N, H, W] with the image's size {pixels.shape[:2]}, got {masks.shape}")
    if masks.dtype != bool:
        raise InvalidInputError(f"masks must be boolean, got {masks.dtype}")
    keys = np.ascontiguousarray(dinov2_keys(models, [pixels])[0])
    # The masks as +-1 logits (bilinear to the key grid, then > 0), a chunk at a time: float32
    # logits of every mask at once would be four times the masks' own memory.
    per_mask = 4 * masks.shape[1] * masks.shape[2]
    step = max(1, POOL_CHUNK_BYTES // per_mask)
    pooled = np.concatenate(
        [
            ops.mask_pool(keys, np.where(masks[s : s + step], np.float32(1.0), np.float32(-1.0)), 0.0)
            for s in range(0, len(masks), step)
        ]
        or [np.zeros((0, keys.shape[0]), np.float32)]
    )
    kept = np.flatnonzero(np.abs(pooled).sum(-1) > 0)
    return pooled[kept], kept


def add_examples(
    models: ModelSet,
    database: Database,
    images: Sequence[ImageInput],
    masks: Sequence[np.ndarray],
    labels: Sequence[Sequence[str]],
    things: Mapping[str, bool] | None = None,
    sources: Sequence[str] | None = None,
) -> np.ndarray:
    """Add labelled masks to ``database`` in one pass: ``masks[i]`` [N_i, H, W] bool with
    ``labels[i]`` (N_i class names, FC-CLIP's ``"name,synonym"`` format) for ``images[i]``.
    Masks too small to cover any key-grid cell are skipped (logged). Returns the new entry ids.

    Each entry records its image as its source (``sources[i]``; by default the image's file name,
    or ``sha256:`` and the start of its digest) and its mask's index in that image.

    ``things`` says which classes are things (countable objects, one panoptic segment each) and
    which are stuff; a class it does not name keeps what the database says, and a new one is
    stuff. A class with several masks in one image (instances) that ends up stuff is warned
    about: its instances would merge into one panoptic segment."""
    if not (len(images) == len(masks) == len(labels)):
        raise InvalidInputError(
            f"images, masks and labels must have the same length: {len(images)}, {len(masks)}, {len(labels)}"
        )
    if sources is not None and len(sources) != len(images):
        raise InvalidInputError(f"{len(sources)} sources for {len(images)} images: give one per image")
    vectors: list[np.ndarray] = []
    names: list[str] = []
    entry_sources: list[str] = []
    mask_indices: list[int] = []
    for i, (image, image_masks, image_labels) in enumerate(zip(images, masks, labels, strict=True)):
        n = 1 if np.asarray(image_masks).ndim == 2 else len(image_masks)
        if len(image_labels) != n:
            raise InvalidInputError(f"image {i}: {n} masks but {len(image_labels)} labels")
        embeddings, kept = embed_masks(models, image, image_masks)
        if len(kept) < n:
            log.info("image %d: %d of %d masks too small for the key grid, skipped", i, n - len(kept), n)
        vectors.append(embeddings)
        names.extend(image_labels[k] for k in kept)
        entry_sources += [image_source(image) if sources is None else sources[i]] * len(kept)
        mask_indices += [int(k) for k in kept]
    if not names:
        return np.zeros(0, np.int64)
    for name, thing in (things or {}).items():
        database.add_class(name, thing=thing)
    ids = database.add(np.concatenate(vectors), names, sources=entry_sources, mask_indices=mask_indices)
    _warn_instances_left_stuff(database, labels)
    return ids


def image_source(image: ImageInput) -> str:
    """What an image is called as a source: a path's file name, else ``sha256:`` and the first 16
    hex digits of its bytes (encoded bytes, or the pixels of an array or PIL image)."""
    if isinstance(image, (str, os.PathLike)):
        return Path(image).name or str(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, np.ndarray):
        data = np.ascontiguousarray(image).tobytes()
    else:  # a PIL image
        data = image.tobytes()
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


def _warn_instances_left_stuff(database: Database, labels: Sequence[Sequence[str]]) -> None:
    repeated = {name for image_labels in labels for name in image_labels if list(image_labels).count(name) > 1}
    vocabulary = database.vocabulary
    stuff = sorted({info.name for name in repeated if (info := vocabulary.find(name)) is not None and not info.thing})
    if stuff:
        log.warning(
            "classes %s were added from several masks per image (instances) but are stuff, so their instances "
            "merge into one panoptic segment; mark them as things (things={name: True}, add_class(..., thing=True))",
            stuff,
        )


@dataclass(frozen=True)
class ConceptMask:
    """A proposal that was labelled with the concept and added: which image and query, its mask
    confidence (mean mask probability inside the mask) and class confidence (the concept's
    probability in FC-CLIP's ensemble over the vocabulary and the concept)."""

    image: int
    query: int
    mask_confidence: float
    class_confidence: float


def mask_confidences(masks: np.ndarray) -> np.ndarray:
    """[Q] mean sigmoid of each mask's logits where they are > 0 (0 for an empty mask), the
    mask score of FC-CLIP's instance inference."""
    inside = masks > 0
    probs = 1.0 / (1.0 + np.exp(-masks.astype(np.float64)))
    area = inside.reshape(len(masks), -1).sum(axis=1)
    return np.where(area > 0, (probs * inside).reshape(len(masks), -1).sum(axis=1) / np.maximum(area, 1), 0.0)


def add_concept(
    models: ModelSet,
    database: Database,
    text: TextBank,
    name: str,
    images: Sequence[ImageInput],
    *,
    mask_confidence: float,
    class_confidence: float,
    thing: bool | None = None,
) -> list[ConceptMask]:
    """Concept customisation from unlabelled images: FC-CLIP's class-agnostic proposals (its
    query masks) whose mask confidence reaches ``mask_confidence`` and whose probability of being
    ``name`` (FC-CLIP's classification over the database's vocabulary plus ``name``) reaches
    ``class_confidence`` are labelled ``name`` and added, as many per image as pass. Returns what
    was added."""
    concept = name.split(",")[0].strip()
    classes = sorted(database.vocabulary.values(), key=lambda c: c.id)
    existing = next((i for i, c in enumerate(classes) if concept in c.names), None)
    if existing is None:
        classes.append(ClassInfo(classes[-1].id + 1 if classes else 0, concept, tuple(_names(name)[1:])))
        existing = len(classes) - 1
    classifier = build_classifier(classes, text, models.head)
    vectors, added = [], []
    for index, image in enumerate(images):
        pixels = load_image(image)
        x = fcclip_input_for(models, pixels)
        out = models.fcclip.infer({"images": x.tensor})
        masks = valid_masks(out["mask_logits"][0], x.resized)
        p_concept = classify(models.head, classifier, out["class_embed"][0], out["ov_embed"][0]).classes[:, existing]
        m_conf = mask_confidences(masks)
        chosen = np.flatnonzero((m_conf >= mask_confidence) & (p_concept >= class_confidence) & (m_conf > 0))
        if not len(chosen):
            continue
        keys = dinov2_keys(models, [pixels])[0]
        vectors.append(ops.mask_pool(np.ascontiguousarray(keys), np.ascontiguousarray(masks[chosen])))
        added += [ConceptMask(index, int(q), float(m_conf[q]), float(p_concept[q])) for q in chosen]
    if vectors:
        # each entry's source is its image, and its "mask" the FC-CLIP query it came from
        sources = [image_source(images[a.image]) for a in added]
        database.add(
            np.concatenate(vectors), [name] * len(added), sources=sources, mask_indices=[a.query for a in added]
        )
        if thing is not None:
            database.add_class(name, thing=thing)
    return added


def _names(label: str) -> list[str]:
    return [n.strip() for n in label.split(",") if n.strip()]
