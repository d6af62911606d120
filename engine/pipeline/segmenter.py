"""The kNN-CLIP pipeline: image in, semantic map and panoptic segments out, with a vocabulary
that grows through the database.

Per image: decode; FC-CLIP's input (resize, pad) and DINOv2's (518x518); FC-CLIP's image part
gives query masks, in-vocabulary class embeddings and CLIP embeddings; classification against
the text classifier of the database's vocabulary and FC-CLIP's geometric ensemble give P_base;
each query mask pools the DINOv2 keys into an embedding whose k nearest database entries give
P_ret; where max P_ret >= T, P_final = lam * P_ret + (1 - lam) * P_base; FC-CLIP's semantic and
panoptic inference run on P_final and the masks resized back to the image.

The vocabulary is the database's: every class there is classified, whether or not it has
examples. ``add_class`` registers a name (FC-CLIP can then predict it from text alone);
``add_examples`` stores mask embeddings that retrieval uses.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from knnclip.engine import ops
from knnclip.engine.config import RetrievalConfig
from knnclip.engine.database import Database
from knnclip.engine.database.vocabulary import ClassInfo
from knnclip.engine.errors import InvalidInputError, KnnclipError, UnknownClassError
from knnclip.engine.pipeline import postprocess
from knnclip.engine.pipeline.models import ModelSet
from knnclip.engine.pipeline.preprocess import FCCLIPInput, ImageInput, dinov2_input, fcclip_input, load_image
from knnclip.engine.text.textbank import TextBank

log = logging.getLogger("knnclip.segmenter")


@dataclass(frozen=True)
class Evidence:
    """What retrieval said about one query (and the segment it made)."""

    base_class: str
    retrieved_class: str | None
    retrieval_confidence: float
    neighbours: tuple[tuple[str, float], ...]  # (class, cosine similarity), nearest first
    changed: bool


@dataclass(frozen=True)
class PanopticSegment:
    id: int
    class_id: int
    name: str
    score: float
    area: int
    is_thing: bool
    evidence: Evidence

    def to_json(self) -> dict[str, Any]:
        evidence = dataclasses.asdict(self.evidence)
        evidence["retrieval_confidence"] = round(evidence["retrieval_confidence"], 6)
        evidence["neighbours"] = [[name, round(sim, 6)] for name, sim in self.evidence.neighbours]
        return {
            "id": self.id, "class_id": self.class_id, "name": self.name, "score": round(self.score, 6),
            "area": self.area, "is_thing": self.is_thing, "evidence": evidence,
        }  # fmt: skip


@dataclass
class Result:
    """The segmentation of one image.

    ``semantic`` [H, W] int32 holds database class ids (``classes`` names them); ``panoptic``
    [H, W] int32 holds segment ids (0 = void), described by ``segments``. ``timings`` are
    milliseconds per stage.
    """

    semantic: np.ndarray
    panoptic: np.ndarray
    segments: list[PanopticSegment]
    classes: dict[int, str]
    timings: dict[str, float] = field(default_factory=dict)
    name: str = ""

    def to_json(self) -> dict[str, Any]:
        present = np.unique(self.semantic).tolist()
        return {
            "image": self.name,
            "size": list(self.semantic.shape),
            "semantic_classes": {str(c): self.classes[c] for c in present if c in self.classes},
            "segments": [s.to_json() for s in self.segments],
            "timings_ms": {k: round(v, 3) for k, v in self.timings.items()},
        }


@dataclass(frozen=True)
class _Vocab:
    """The classifier of one vocabulary version: rows per synonym (class-major) + void."""

    classes: list[ClassInfo]
    classifier: np.ndarray  # [S + 1, E]
    synonyms_per_class: list[int]
    seen: np.ndarray  # [C] bool
    lut: np.ndarray  # database class id + 1 -> class index (0 -> -1 for "no neighbour")
    is_thing: list[bool]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]


@dataclass
class _Proposal:
    """One image's model outputs before retrieval (what a sweep over retrieval settings reuses)."""

    x: FCCLIPInput
    masks: np.ndarray  # [Q, h, w] mask logits over the padded input at stride 4
    base: postprocess.ClassProbabilities
    queries: np.ndarray  # [Q, D] pooled DINOv2 keys
    vocab: _Vocab
    _full: np.ndarray | None = None

    def full_masks(self) -> np.ndarray:
        """[Q, H, W] mask logits at the image's size (computed once)."""
        if self._full is None:
            self._full = postprocess.resize_masks(self.masks, self.x.padded, self.x.resized, self.x.original)
        return self._full


@dataclass(frozen=True)
class _Fusion:
    index: np.ndarray  # [Q, k] neighbour class indices (-1: none)
    sims: np.ndarray  # [Q, k] similarities (0 where no neighbour)
    p_ret: np.ndarray
    fused: np.ndarray
    mask_cls: np.ndarray  # [Q, C + 1] with void


class _Timer:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        yield
        self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1e3


class Segmenter:
    """kNN-CLIP segmentation over exported models and a database.

    Examples
    --------
    >>> seg = Segmenter.from_dir("models", database="classes.db")      # doctest: +SKIP
    >>> seg.add_examples([image], [masks], [["cat", "sofa"]])           # doctest: +SKIP
    >>> result = seg.segment("photo.jpg")                               # doctest: +SKIP
    >>> result.segments[0].name, result.timings["total"]                # doctest: +SKIP
    """

    def __init__(
        self,
        models: ModelSet,
        database: Database,
        config: RetrievalConfig | None = None,
        *,
        text_cache: str | os.PathLike[str] | None = "default",
        owns_database: bool = False,
    ) -> None:
        if database.dim != models.embedding_dim:
            raise InvalidInputError(
                f"the database holds {database.dim}-d embeddings but the DINOv2 model gives "
                f"{models.embedding_dim}-d keys; use a database built with this DINOv2 model"
            )
        self.models = models
        self.db = database
        self.config = config or RetrievalConfig()
        self.text = TextBank(
            models.text, models.tokenizer, models.templates, models.text_weights_sha256, models.context_length,
            cache_dir=text_cache,
        )  # fmt: skip
        self._owns_database = owns_database
        self._owns_models = True
        self._vocab: _Vocab | None = None
        self._vocab_key: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_dir(
        cls,
        models_dir: str | os.PathLike[str],
        database: str | os.PathLike[str] | Database,
        *,
        backend: str = "auto",
        device: str = "auto",
        config: RetrievalConfig | None = None,
        read_only: bool = False,
        text_cache: str | os.PathLike[str] | None = "default",
    ) -> Segmenter:
        """Open the models in ``models_dir`` and the database (a path is created when missing)."""
        models = ModelSet(models_dir, backend, device)
        if isinstance(database, Database):
            return cls(models, database, config, text_cache=text_cache)
        path = Path(database)
        if path.exists():
            db = Database.open(path, read_only=read_only)
        else:
            if read_only:
                raise InvalidInputError(f"{path}: no database there to open read-only")
            db = Database.create(path, models.embedding_dim)
        return cls(models, db, config, text_cache=text_cache, owns_database=True)

    def with_database(self, database: Database) -> Segmenter:
        """A segmenter over another database that shares this one's models and text embeddings
        (closing it closes neither)."""
        other = copy.copy(self)
        other.db, other._owns_database, other._owns_models = database, False, False
        other._vocab, other._vocab_key, other._lock = None, None, threading.Lock()
        return other

    def close(self) -> None:
        if self._owns_database:
            self.db.close()
        if self._owns_models:
            self.models.close()

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Vocabulary --------------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return self._vocabulary().names

    def _vocabulary(self) -> _Vocab:
        vocab = self.db.vocabulary
        key = tuple((c.id, c.names, c.thing) for c in vocab.values())
        with self._lock:
            if self._vocab is not None and key == self._vocab_key:
                return self._vocab
            classes = sorted(vocab.values(), key=lambda c: c.id)
            if not classes:
                raise InvalidInputError(
                    "the vocabulary is empty: add classes first (add_class, add_examples, or knnclip db add)"
                )
            rows = self.text.rows([name for c in classes for name in c.names])
            classifier = np.concatenate([rows, self.models.head.void_embedding[None]]).astype(np.float32)
            lut = np.full(classes[-1].id + 2, -1, np.int64)
            for index, c in enumerate(classes):
                lut[c.id + 1] = index
            seen = np.array([any(n in self.models.head.seen_names for n in c.names) for c in classes])
            per_class = [len(c.names) for c in classes]
            self._vocab = _Vocab(classes, classifier, per_class, seen, lut, [c.thing for c in classes])
            self._vocab_key = key
            return self._vocab

    def add_class(self, name: str, synonyms: Sequence[str] = (), *, thing: bool | None = None) -> ClassInfo:
        """Register a class by name (FC-CLIP can predict it from its text embedding alone)."""
        info = self.db.add_class(name, synonyms, thing=thing)
        self.text.rows(list(info.names))
        return info

    def remove_class(self, name: str) -> int:
        """Delete a class and its database entries; returns how many entries went."""
        return self.db.remove_class(name)

    # Segmentation ------------------------------------------------------------------------------
    def segment(self, image: ImageInput, name: str | None = None, *, panoptic: bool = True) -> Result:
        """Segment one image (path, bytes, PIL image or uint8 [H, W, 3] array). With
        ``panoptic=False`` the panoptic inference is skipped (``panoptic`` all void, no segments)."""
        timer = _Timer()
        with timer.stage("total"):
            with timer.stage("decode"):
                pixels = load_image(image, name)
            result = self._segment_pixels(pixels, timer, panoptic)
        result.timings = timer.ms
        result.name = name or (str(image) if isinstance(image, (str, os.PathLike)) else "")
        return result

    def segment_batch(
        self, images: Sequence[ImageInput], *, panoptic: bool = True, batch_size: int = 4
    ) -> list[Result | KnnclipError]:
        """Segment several images, up to ``batch_size`` at a time through each model and one
        database search per batch. An image that fails yields its error in place of a result and
        the others are unaffected: a batch whose models fail is retried one image at a time.

        Stages run once per batch (``preprocess``, ``fcclip``, ``dinov2``, ``search``) report the
        batch's time in every result of it, with ``timings["batch_size"]``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out: list[Result | KnnclipError | None] = [None] * len(images)
        decoded: list[tuple[int, str, np.ndarray, _Timer]] = []
        for i, image in enumerate(images):
            name = str(image) if isinstance(image, (str, os.PathLike)) else f"#{i}"
            timer = _Timer()
            try:
                with timer.stage("decode"):
                    decoded.append((i, name, load_image(image, name), timer))
            except KnnclipError as exc:
                out[i] = exc
        for start in range(0, len(decoded), batch_size):
            chunk = decoded[start : start + batch_size]
            batch = [pixels for _, _, pixels, _ in chunk]
            try:
                results: list[Result | KnnclipError] = list(self._segment_chunk(batch, panoptic))
            except KnnclipError:
                results = [self._segment_or_error(pixels, panoptic) for pixels in batch]  # find the culprit
            for (i, name, _, decode), result in zip(chunk, results, strict=True):
                if isinstance(result, Result):
                    result.timings["total"] += decode.ms["decode"]
                    result.timings["decode"] = decode.ms["decode"]
                    result.name = name
                out[i] = result
        assert all(r is not None for r in out)
        return cast("list[Result | KnnclipError]", out)

    def _segment_or_error(self, pixels: np.ndarray, panoptic: bool) -> Result | KnnclipError:
        timer = _Timer()
        try:
            with timer.stage("total"):
                result = self._segment_pixels(pixels, timer, panoptic)
        except KnnclipError as exc:
            return exc
        result.timings = timer.ms
        return result

    def _segment_chunk(self, batch: list[np.ndarray], panoptic: bool) -> list[Result]:
        """One batch through the models and one search; then each image on its own."""
        shared, own = _Timer(), [_Timer() for _ in batch]
        proposals = self._propose_batch(batch, shared, own)
        with shared.stage("search"):
            sims, labels, _ = self.db.search(np.concatenate([p.queries for p in proposals]), self.config.k)
        results, row = [], 0
        for p, timer in zip(proposals, own, strict=True):
            rows = slice(row, row + len(p.queries))
            row = rows.stop
            before = sum(timer.ms.values())  # classify and pool
            with timer.stage("total"):
                result = self._decide(p, sims[rows], labels[rows], self.config, timer, panoptic=panoptic)
            result.timings = {**timer.ms, **shared.ms, "batch_size": float(len(batch))}
            result.timings["total"] += before + sum(shared.ms.values())
            results.append(result)
        return results

    def _fcclip_input(self, pixels: np.ndarray) -> FCCLIPInput:
        head = self.models.head
        return fcclip_input(
            pixels, head.pixel_mean, head.pixel_std, short=head.min_size, max_size=head.max_size,
            pad_to=self.models.fcclip_size,
        )  # fmt: skip

    def _segment_pixels(self, pixels: np.ndarray, timer: _Timer, panoptic: bool = True) -> Result:
        proposal = self._propose(pixels, timer)
        with timer.stage("search"):
            sims, labels, _ = self.db.search(proposal.queries, self.config.k)
        return self._decide(proposal, sims, labels, self.config, timer, panoptic=panoptic)

    def _propose(self, pixels: np.ndarray, timer: _Timer) -> _Proposal:
        """Everything before the database: masks, P_base and the query embeddings."""
        return self._propose_batch([pixels], timer)[0]

    def _propose_batch(
        self, batch: list[np.ndarray], timer: _Timer, per_image: list[_Timer] | None = None
    ) -> list[_Proposal]:
        """_propose for several images, each model run once on all of them (every FC-CLIP input
        is padded to the model's input size, every DINOv2 input is its square). The per-image
        stages (classify, pool) go to ``per_image[i]`` when given, else to ``timer``."""
        cfg, head = self.config, self.models.head
        vocab = self._vocabulary()
        with timer.stage("preprocess"):
            xs = [self._fcclip_input(pixels) for pixels in batch]
            fcclip_in = np.concatenate([x.tensor for x in xs])
            dinov2_in = np.concatenate([dinov2_input(pixels, self.models.dinov2_size) for pixels in batch])
        with timer.stage("fcclip"):
            out = self.models.fcclip.infer({"images": fcclip_in})
        with timer.stage("dinov2"):
            keys = self.models.dinov2.infer({"images": dinov2_in})["keys"]
        proposals = []
        for i, x in enumerate(xs):
            own = per_image[i] if per_image is not None else timer
            masks = out["mask_logits"][i]
            with own.stage("classify"):
                in_vocab = postprocess.classification_logits(
                    out["class_embed"][i], vocab.classifier, head.in_vocab_logit_scale, vocab.synonyms_per_class
                )
                ov = postprocess.classification_logits(
                    out["ov_embed"][i], vocab.classifier, head.clip_logit_scale, vocab.synonyms_per_class
                )
                base = postprocess.geometric_ensemble(in_vocab, ov, vocab.seen, head.alpha, head.beta)
            with own.stage("pool"):
                # The masks cover the padded input at stride 4; DINOv2 saw the unpadded image only.
                valid = masks[:, : -(-x.resized[0] // 4), : -(-x.resized[1] // 4)]
                queries = ops.mask_pool(np.ascontiguousarray(keys[i]), np.ascontiguousarray(valid), cfg.mask_threshold)
            proposals.append(_Proposal(x, masks, base, queries, vocab))
        return proposals

    def _decide(
        self,
        p: _Proposal,
        sims: np.ndarray,
        labels: np.ndarray,
        cfg: RetrievalConfig,
        timer: _Timer,
        *,
        panoptic: bool = True,
    ) -> Result:
        """Neighbours to P_ret, fusion, and FC-CLIP's semantic and panoptic inference."""
        head, vocab = self.models.head, p.vocab
        with timer.stage("fuse"):
            fusion = self._fuse(p, sims, labels, cfg)
        with timer.stage("postprocess"):
            full = p.full_masks()
            semantic = self._semantic(p, fusion.mask_cls)
            if panoptic:
                panoptic_map, segs = postprocess.panoptic_inference(
                    fusion.mask_cls, full, vocab.is_thing, head.object_mask_threshold, head.overlap_threshold
                )
            else:
                panoptic_map, segs = np.zeros(semantic.shape, np.int32), []
        index, sims, p_ret, fused = fusion.index, fusion.sims, fusion.p_ret, fusion.fused
        ids = np.array([c.id for c in vocab.classes], np.int32)
        names = vocab.names
        base_top = p.base.classes.argmax(-1)
        ret_top = p_ret.argmax(-1)
        ret_conf = p_ret.max(-1)
        changed = fused.argmax(-1) != base_top

        def evidence(q: int) -> Evidence:
            neighbours = tuple((names[i], float(v)) for i, v in zip(index[q], sims[q], strict=True) if i >= 0)
            retrieved = names[ret_top[q]] if ret_conf[q] > 0 else None
            return Evidence(names[base_top[q]], retrieved, float(ret_conf[q]), neighbours, bool(changed[q]))

        segments = [
            PanopticSegment(s.id, int(ids[s.category_id]), names[s.category_id], s.score, s.area, s.isthing,
                            evidence(s.query))
            for s in segs
        ]  # fmt: skip
        return Result(semantic, panoptic_map, segments, {c.id: c.name for c in vocab.classes})

    def _fuse(self, p: _Proposal, sims: np.ndarray, labels: np.ndarray, cfg: RetrievalConfig) -> _Fusion:
        vocab = p.vocab
        index = vocab.lut[np.where(labels >= 0, labels, -1) + 1]  # a class removed mid-search maps to -1
        sims = np.where(index >= 0, sims, 0.0).astype(np.float32)
        p_ret = ops.retrieval_probs(sims, index, len(vocab.classes), cfg.tau)
        fused = ops.fuse(p.base.classes.astype(np.float32), p_ret, cfg.T, cfg.lam)
        mask_cls = postprocess.ClassProbabilities(fused, p.base.void).mask_cls()
        return _Fusion(index, sims, p_ret, fused, mask_cls)

    def _semantic(self, p: _Proposal, mask_cls: np.ndarray) -> np.ndarray:
        """[H, W] database class ids: FC-CLIP's semantic inference on the image-sized masks."""
        labels = postprocess.semantic_labels(postprocess.semantic_probs(mask_cls), p.full_masks())
        ids = np.array([c.id for c in p.vocab.classes], np.int32)
        return ids[labels]

    # Growing the database ----------------------------------------------------------------------
    def embed_masks(self, image: ImageInput, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """DINOv2 mask embeddings of ground-truth ``masks`` [N, H, W] (bool, the image's size):
        (embeddings [M, D] for the masks that survive at the keys' resolution, their indices)."""
        pixels = load_image(image)
        masks = np.asarray(masks)
        if masks.ndim == 2:
            masks = masks[None]
        if masks.ndim != 3 or masks.shape[1:] != pixels.shape[:2]:
            raise InvalidInputError(
                f"masks must be [N, H, W] with the image's size {pixels.shape[:2]}, got {masks.shape}"
            )
        if masks.dtype != bool:
            raise InvalidInputError(f"masks must be boolean, got {masks.dtype}")
        keys = self.models.dinov2.infer({"images": dinov2_input(pixels, self.models.dinov2_size)})["keys"][0]
        logits = np.where(masks, np.float32(1.0), np.float32(-1.0))  # bilinear to the key grid, then > 0
        pooled = ops.mask_pool(np.ascontiguousarray(keys), logits, 0.0)
        kept = np.flatnonzero(np.abs(pooled).sum(-1) > 0)
        return pooled[kept], kept

    def add_examples(
        self, images: Sequence[ImageInput], masks: Sequence[np.ndarray], labels: Sequence[Sequence[str]]
    ) -> np.ndarray:
        """Add labelled masks to the database in one pass: ``masks[i]`` [N_i, H, W] bool with
        ``labels[i]`` (N_i class names, FC-CLIP's ``"name,synonym"`` format) for ``images[i]``.
        Masks too small to cover any key-grid cell are skipped (logged). Returns the new entry ids."""
        if not (len(images) == len(masks) == len(labels)):
            raise InvalidInputError(
                f"images, masks and labels must have the same length: {len(images)}, {len(masks)}, {len(labels)}"
            )
        vectors, names = [], []
        for i, (image, image_masks, image_labels) in enumerate(zip(images, masks, labels, strict=True)):
            n = 1 if np.asarray(image_masks).ndim == 2 else len(image_masks)
            if len(image_labels) != n:
                raise InvalidInputError(f"image {i}: {n} masks but {len(image_labels)} labels")
            embeddings, kept = self.embed_masks(image, image_masks)
            if len(kept) < n:
                log.info("image %d: %d of %d masks too small for the key grid, skipped", i, n - len(kept), n)
            vectors.append(embeddings)
            names.extend(image_labels[k] for k in kept)
        if not names:
            return np.zeros(0, np.int64)
        ids = self.db.add(np.concatenate(vectors), names)
        self._vocabulary()  # compute the text rows of new classes now, not in the first segment call
        return ids

    def add_concept(
        self,
        name: str,
        images: Sequence[ImageInput],
        *,
        thing: bool | None = None,
        min_similarity: float | None = None,
    ) -> list[float]:
        """Concept customisation from unlabelled images: in each image, the FC-CLIP mask whose CLIP
        embedding is most similar to ``name``'s text embedding is labelled ``name`` and added.
        Returns the chosen masks' cosine similarities; with ``min_similarity``, an image whose best
        mask scores lower adds nothing (an image with no non-empty mask never does: NaN)."""
        target = self.text.rows([name.split(",")[0].strip()])[0]
        vectors, scores = [], []
        for image in images:
            pixels = load_image(image)
            x = self._fcclip_input(pixels)
            out = self.models.fcclip.infer({"images": x.tensor})
            ov = postprocess.l2_normalize(out["ov_embed"][0])
            masks = out["mask_logits"][0][:, : -(-x.resized[0] // 4), : -(-x.resized[1] // 4)]
            nonempty = (masks > 0).any(axis=(1, 2))
            if not nonempty.any():
                scores.append(float("nan"))
                continue
            sims = np.where(nonempty, ov @ target, -np.inf)
            best = int(sims.argmax())
            scores.append(float(sims[best]))
            if min_similarity is not None and sims[best] < min_similarity:
                continue
            keys = self.models.dinov2.infer({"images": dinov2_input(pixels, self.models.dinov2_size)})["keys"][0]
            vectors.append(ops.mask_pool(np.ascontiguousarray(keys), np.ascontiguousarray(masks[best : best + 1])))
        if vectors:
            self.db.add(np.concatenate(vectors), [name] * len(vectors))
            if thing is not None:
                self.db.add_class(name, thing=thing)
        return scores

    def class_id(self, name: str) -> int:
        info = self.db.vocabulary.find(name)
        if info is None:
            raise UnknownClassError(f"no class named {name!r}")
        return info.id
