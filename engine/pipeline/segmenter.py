"""The kNN-CLIP segmenter: the lifecycle of the models and the database, the classifier of the
current vocabulary, and batching; the work itself is done by the stages in
:mod:`knnclip.engine.pipeline.stages` and the growth functions in :mod:`knnclip.engine.pipeline.growth`.

Per image: decode; FC-CLIP's input (resize, pad) and DINOv2's (518x518); FC-CLIP's image part
gives query masks, in-vocabulary class embeddings and CLIP embeddings; classification against
the text classifier of the database's vocabulary and FC-CLIP's geometric ensemble give P_base;
each query mask pools the DINOv2 keys into an embedding whose k nearest database entries give
P_ret; where max P_ret >= T, retrieval is mixed into FC-CLIP's out-of-vocabulary distribution
before its ensemble (``RetrievalConfig.fusion``, docs/pipeline.md); FC-CLIP's semantic and
panoptic inference run on the result and the masks resized back to the image.

The vocabulary is the database's: every class there is classified, whether or not it has
examples. ``add_class`` registers a name (FC-CLIP can then predict it from text alone);
``add_examples`` stores mask embeddings that retrieval uses.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from knnclip.engine.config import RetrievalConfig
from knnclip.engine.database import Database
from knnclip.engine.database.database import EntryRecord
from knnclip.engine.database.vocabulary import ClassInfo
from knnclip.engine.errors import InferenceError, InvalidInputError, KnnclipError, UnknownClassError
from knnclip.engine.pipeline import growth, stages
from knnclip.engine.pipeline.arrays import ArrayModule
from knnclip.engine.pipeline.classifier import Classifier, ClassifierCache
from knnclip.engine.pipeline.models import ModelSet
from knnclip.engine.pipeline.preprocess import ImageInput, load_image
from knnclip.engine.pipeline.results import Evidence, PanopticSegment, Result
from knnclip.engine.pipeline.search import DeviceScan, device_scan_for
from knnclip.engine.pipeline.stages import Proposal
from knnclip.engine.pipeline.timing import Timer
from knnclip.engine.text.textbank import TextBank

__all__ = ["Evidence", "PanopticSegment", "Result", "Segmenter"]

log = logging.getLogger("knnclip.pipeline")


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
        arrays: ArrayModule | None = None,
        device_scan: bool | None = None,
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
            models.text,
            models.tokenizer,
            models.templates,
            models.text_weights_sha256,
            models.context_length,
            cache_dir=text_cache,
        )
        self._owns_database = owns_database
        self._owns_models = True
        self._classifiers = ClassifierCache(self.text, models.head)
        # Where the pipeline's arrays live (``models.array_module()``: the models' GPU when their
        # outputs can stay there), and the flat database's copy there for search: by default
        # wherever the arrays are on a device (``device_scan=True`` scans on the host too).
        self.xp = arrays if arrays is not None else models.array_module()
        self._device_scan = device_scan
        self._scan: DeviceScan | None = device_scan_for(database, self.xp, device_scan)

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
        search: str = "fp32",
        arrays: ArrayModule | None = None,
        device_scan: bool | None = None,
    ) -> Segmenter:
        """Open the models in ``models_dir`` and the database (a path is created when missing);
        ``search="bf16"`` searches a flat database in bfloat16 (``Database.open``); ``arrays`` and
        ``device_scan`` as for the constructor."""
        models = ModelSet(models_dir, backend, device)
        where: dict[str, Any] = {"arrays": arrays, "device_scan": device_scan}
        db: Database | None = None
        try:
            if isinstance(database, Database):
                if search != "fp32":
                    raise InvalidInputError(
                        "search= applies when the database is opened here; pass a path, "
                        "or open the Database with search= yourself"
                    )
                return cls(models, database, config, text_cache=text_cache, **where)
            path = Path(database)
            if path.exists():
                db = Database.open(path, read_only=read_only, search=search)
            elif read_only:
                raise InvalidInputError(f"{path}: no database there to open read-only")
            else:
                db = Database.create(path, models.embedding_dim)  # holds the writer lock from the start
                if search != "fp32":
                    db.close()
                    db = Database.open(path, search=search)
            return cls(models, db, config, text_cache=text_cache, owns_database=True, **where)
        except BaseException:
            # Nothing half-open stays behind: the database's lock and the sessions are released.
            if db is not None:
                db.close(checkpoint=False)
            models.close()
            raise

    def with_database(self, database: Database) -> Segmenter:
        """A segmenter over another database that shares this one's models and text embeddings
        (closing it closes neither)."""
        other = copy.copy(self)
        other._borrow(database)  # noqa: SLF001 - a copy of this segmenter, made here
        return other

    def _borrow(self, database: Database) -> None:
        """Search ``database`` with models and text embeddings owned elsewhere (closing closes neither)."""
        self.db, self._owns_database, self._owns_models = database, False, False
        self._classifiers = ClassifierCache(self.text, self.models.head)
        self._scan = device_scan_for(database, self.xp, self._device_scan)

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
        return self.classifier().names

    def classifier(self) -> Classifier:
        """The text classifier of the database's current vocabulary (cached until it changes)."""
        return self._classifiers.get(self.db.vocabulary)

    def add_class(self, name: str, synonyms: Sequence[str] = (), *, thing: bool | None = None) -> ClassInfo:
        """Register a class by name (FC-CLIP can predict it from its text embedding alone)."""
        info = self.db.add_class(name, synonyms, thing=thing)
        self.text.rows(list(info.names))
        return info

    def remove_class(self, name: str) -> int:
        """Delete a class and its database entries; returns how many entries went."""
        return self.db.remove_class(name)

    def entries(
        self, class_name: str | None = None, source: str | None = None, *, offset: int = 0, limit: int | None = None
    ) -> list[EntryRecord]:
        """The database's entries with where each came from (:meth:`Database.entries`)."""
        return self.db.entries(class_name, source, offset=offset, limit=limit)

    def remove_source(self, source: str) -> int:
        """Delete every entry added from ``source`` (an image's file name or digest, or the source
        given); returns how many went."""
        return self.db.remove_source(source)

    def remove_entries(self, ids: Sequence[int] | np.ndarray) -> int:
        """Delete single database entries (:meth:`Database.remove_entries`); returns how many went."""
        return self.db.remove_entries(ids)

    def rename_class(self, old: str, new: str) -> ClassInfo:
        """Rename a class, keeping its id and entries; its new name's text embedding is computed
        now, so the next segmentation does not wait for it."""
        info = self.db.rename_class(old, new)
        self.text.rows(list(info.names))
        return info

    def merge_classes(self, source: str, target: str) -> ClassInfo:
        """Move ``source``'s entries and names into ``target`` and remove ``source``."""
        info = self.db.merge_classes(source, target)
        self.text.rows(list(info.names))
        return info

    def class_id(self, name: str) -> int:
        info = self.db.vocabulary.find(name)
        if info is None:
            raise UnknownClassError(f"no class named {name!r}")
        return info.id

    # Segmentation ------------------------------------------------------------------------------
    def segment(
        self, image: ImageInput, name: str | None = None, *, panoptic: bool = True, instance: bool = False
    ) -> Result:
        """Segment one image (path, bytes, PIL image or uint8 [H, W, 3] array). With
        ``panoptic=False`` the panoptic inference is skipped (``panoptic`` all void, no segments);
        with ``instance=True`` FC-CLIP's instance inference fills ``Result.instances``."""
        wanted = {"panoptic": panoptic, "instance": instance}
        timer = self._timer()
        with timer.stage("total"):
            with timer.stage("decode"):
                pixels = load_image(image, name)
            result = self._segment_pixels(pixels, timer, wanted)
        result.timings = timer.ms
        result.name = name or (str(image) if isinstance(image, (str, os.PathLike)) else "")
        return result

    def segment_batch(
        self,
        images: Sequence[ImageInput],
        *,
        panoptic: bool = True,
        instance: bool = False,
        batch_size: int = 4,
    ) -> list[Result | KnnclipError]:
        """Segment several images, up to ``batch_size`` at a time through each model and one
        database search per batch. An image that fails yields its error in place of a result and
        the others are unaffected: a batch that fails (a library error, or a model runtime's own:
        then an :class:`InferenceError` for the image that caused it) is retried one image at a time.

        Stages run once per batch (``preprocess``, ``fcclip``, ``dinov2``, ``search``) report the
        batch's time in every result of it, with ``timings["batch_size"]``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        wanted = {"panoptic": panoptic, "instance": instance}
        out: list[Result | KnnclipError | None] = [None] * len(images)
        decoded: list[tuple[int, str, np.ndarray, Timer]] = []
        for i, image in enumerate(images):
            name = str(image) if isinstance(image, (str, os.PathLike)) else f"#{i}"
            timer = self._timer()
            try:
                with timer.stage("decode"):
                    decoded.append((i, name, load_image(image, name), timer))
            except KnnclipError as exc:
                out[i] = exc
        for start in range(0, len(decoded), batch_size):
            chunk = decoded[start : start + batch_size]
            batch = [pixels for _, _, pixels, _ in chunk]
            try:
                results: list[Result | KnnclipError] = list(self._segment_chunk(batch, wanted))
            except Exception:  # noqa: BLE001 - a library or runtime error: each image alone finds the culprit
                results = [self._segment_or_error(pixels, wanted) for pixels in batch]
            for (i, name, _, decode), result in zip(chunk, results, strict=True):
                if isinstance(result, Result):
                    result.timings["total"] += decode.ms["decode"]
                    result.timings["decode"] = decode.ms["decode"]
                    result.name = name
                out[i] = result
        assert all(r is not None for r in out)
        return cast("list[Result | KnnclipError]", out)

    def propose(
        self, images: Sequence[np.ndarray], timer: Timer, per_image: Sequence[Timer] | None = None
    ) -> list[Proposal]:
        """:func:`stages.propose` with this segmenter's models, classifier and mask threshold, on
        its array module (:attr:`xp`)."""
        classifier, threshold = self.classifier(), self.config.mask_threshold
        return stages.propose(self.models, classifier, images, threshold, timer, per_image, xp=self.xp)

    def retrieve(self, queries: Any, k: int) -> tuple[Any, Any]:
        """:func:`stages.retrieve` in this segmenter's database, where the queries are."""
        return stages.retrieve(self.db, queries, k, xp=self.xp, scan=self._scan)

    def _timer(self) -> Timer:
        return Timer(None if self.xp.on_host else self.xp.synchronize)

    def _segment_or_error(self, pixels: np.ndarray, wanted: dict[str, bool]) -> Result | KnnclipError:
        timer = self._timer()
        try:
            with timer.stage("total"):
                result = self._segment_pixels(pixels, timer, wanted)
        except KnnclipError as exc:
            return exc
        except Exception as exc:  # a runtime's own error fails this image only, and is logged whole
            log.exception("segmenting an image failed in the model runtime")
            return InferenceError(f"the model runtime failed on this image ({type(exc).__name__}: {exc})")
        result.timings = timer.ms
        return result

    def _segment_chunk(self, batch: list[np.ndarray], wanted: dict[str, bool]) -> list[Result]:
        """One batch through the models and one search; then each image on its own."""
        shared, own = self._timer(), [self._timer() for _ in batch]
        proposals = self.propose(batch, shared, own)
        with shared.stage("search"):
            sims, labels = self.retrieve(self.xp.concatenate([p.queries for p in proposals]), self.config.k)
        results, row = [], 0
        for p, timer in zip(proposals, own, strict=True):
            rows = slice(row, row + int(p.queries.shape[0]))
            row = rows.stop
            before = timer.total()  # classify and pool
            with timer.stage("total"):
                result = stages.decide(self.models.head, p, sims[rows], labels[rows], self.config, timer, **wanted)
            result.timings = {**timer.ms, **shared.ms, "batch_size": float(len(batch))}
            result.timings["total"] += before + shared.total()
            results.append(result)
        return results

    def _segment_pixels(self, pixels: np.ndarray, timer: Timer, wanted: dict[str, bool]) -> Result:
        (proposal,) = self.propose([pixels], timer)
        with timer.stage("search"):
            sims, labels = self.retrieve(proposal.queries, self.config.k)
        return stages.decide(self.models.head, proposal, sims, labels, self.config, timer, **wanted)

    # Growing the database ----------------------------------------------------------------------
    def embed_masks(self, image: ImageInput, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:func:`growth.embed_masks` with this segmenter's models."""
        return growth.embed_masks(self.models, image, masks)

    def add_examples(
        self,
        images: Sequence[ImageInput],
        masks: Sequence[np.ndarray],
        labels: Sequence[Sequence[str]],
        *,
        things: Mapping[str, bool] | None = None,
        sources: Sequence[str] | None = None,
    ) -> np.ndarray:
        """:func:`growth.add_examples` into this segmenter's database (``things``: which classes
        are things; ``sources``: what each image is called, by default its file name or digest);
        the text rows of new classes are computed now, not in the first segment call."""
        ids = growth.add_examples(self.models, self.db, images, masks, labels, things, sources)
        if len(ids):
            self.classifier()
        return ids

    def add_concept(
        self,
        name: str,
        images: Sequence[ImageInput],
        *,
        thing: bool | None = None,
        mask_confidence: float | None = None,
        class_confidence: float | None = None,
    ) -> list[growth.ConceptMask]:
        """:func:`growth.add_concept` into this segmenter's database; the thresholds default to
        the config's ``concept_mask_confidence`` and ``concept_class_confidence``."""
        cfg = self.config
        return growth.add_concept(
            self.models,
            self.db,
            self.text,
            name,
            images,
            thing=thing,
            mask_confidence=cfg.concept_mask_confidence if mask_confidence is None else mask_confidence,
            class_confidence=cfg.concept_class_confidence if class_confidence is None else class_confidence,
        )
