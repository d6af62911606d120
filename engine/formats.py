"""How a result looks outside the process: the one rendering that the CLI, the HTTP service, the
video outputs and :meth:`Result.to_json` share.

- **The result record** (:func:`result_record`): ``image`` (when the result has a name),
  ``height``, ``width``, ``classes`` (names indexed by class id, ``null`` for a removed class),
  optionally the label maps ``semantic`` and ``panoptic``, ``segments``, ``instances`` and
  ``timings`` (milliseconds per stage). A segment is ``{"id", "class", "class_id", "score",
  "area", "thing", "bbox", "evidence"}`` and an instance ``{"class_id", "class", "score", "area",
  "bbox"}``, each with ``segmentation`` (pycocotools' RLE of its mask) when masks are asked for.
  docs/serving.md is its contract; :func:`result_from_record` reads it back into a ``Result``.
- **Label maps** in a record: run-length encoded in COCO's order (column-major, runs from the
  top-left pixel down each column), ``{"size": [h, w], "counts": [run lengths], "values": [the
  id of each run]}``, or ``{"size", "png"}`` with a base64 label PNG.
- **Label PNGs**: ids as an 8-bit image where every id fits, else 16-bit; ids past 16 bits are
  refused (:func:`label_image`, the one encoder).
- **COCO instance results**: a JSON list of ``{"image_id", "category_id", "segmentation" (RLE),
  "score", "bbox"}``, what ``pycocotools.coco.COCO.loadRes`` and COCOeval take.
- **COCO panoptic**: per image a PNG whose RGB encodes the segment id (``id = R + 256 G + 256^2 B``,
  panopticapi's ``id2rgb``) and an annotation ``{"image_id", "file_name", "segments_info"}``.

:data:`FORMATS` is the one vocabulary of output formats: ``knnclip segment --format`` writes any
of them as files; an HTTP reply (``format=``) takes ``json`` (RLE label maps), ``label-png`` (PNG
label maps) or ``coco-instances`` (RLE label maps, and each mask's COCO RLE). Category ids are the
database's class ids plus one (:data:`COCO_ID_OFFSET`: COCO's tools take 0 for "no category");
:func:`categories` lists them with their names and whether they are things.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from knnclip.engine.database.vocabulary import ClassInfo
from knnclip.engine.errors import InvalidInputError, needs_extra
from knnclip.engine.pipeline.results import Evidence, InstanceMask, PanopticSegment, Result, bbox
from knnclip.engine.render import plot, save_png

FORMATS = ("json", "label-png", "coco-instances", "coco-panoptic")
# The names of docs/serving.md's first version, still taken by ``POST /v1/segment``.
FORMAT_ALIASES = {"png": "label-png", "coco": "coco-instances"}
REPLY_FORMATS = ("json", "label-png", "coco-instances")  # what one JSON reply can hold
COCO_ID_OFFSET = 1  # COCO category id = class id + 1: COCO's tools count categories from 1
MapEncoding = Literal["rle", "png"]


def reply_encoding(fmt: str) -> tuple[MapEncoding, bool]:
    """(how label maps are encoded, whether each mask's COCO RLE is added) for a reply ``format``."""
    fmt = FORMAT_ALIASES.get(fmt, fmt)
    if fmt not in REPLY_FORMATS:
        also = " (coco-panoptic is written as files: knnclip segment --format coco-panoptic)"
        raise InvalidInputError(
            f"format must be one of {', '.join(REPLY_FORMATS)}, got {fmt!r}" + also * (fmt in FORMATS)
        )
    return ("png" if fmt == "label-png" else "rle"), fmt == "coco-instances"


# Masks and label maps ----------------------------------------------------------------------------
def _coco_mask() -> Any:
    try:
        from pycocotools import mask as coco_mask
    except ImportError:
        raise needs_extra("COCO RLE masks (pycocotools)", "video") from None
    return coco_mask


def rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO run-length encoding of a boolean [H, W] mask, JSON-ready (``counts`` as text)."""
    encoded = _coco_mask().encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def rle_mask(encoded: Mapping[str, Any]) -> np.ndarray:
    """The boolean [H, W] mask of :func:`rle`'s encoding."""
    try:
        return _coco_mask().decode({"size": list(encoded["size"]), "counts": encoded["counts"].encode()}).astype(bool)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise InvalidInputError(f"a mask's COCO RLE is malformed ({type(exc).__name__}: {exc})") from None


def label_image(labels: np.ndarray, what: str = "the label map") -> Image.Image:
    """``labels`` [H, W] non-negative ids as an 8-bit image where they all fit, else 16-bit; ids
    outside 0..65535 are refused (a PNG has at most 16 bits per sample: they would wrap silently)."""
    top = int(labels.max(initial=0))
    if labels.min(initial=0) < 0 or top > 65535:
        raise InvalidInputError(f"{what}: ids outside 0..65535 cannot be written as a label PNG (largest {top})")
    return Image.fromarray(labels.astype(np.uint8 if top <= 255 else np.uint16))


def write_label_png(labels: np.ndarray, path: str | os.PathLike[str]) -> None:
    """``labels`` [H, W] as a label PNG (:func:`label_image`), written atomically."""
    save_png(label_image(labels, str(path)), path)


def label_png(labels: np.ndarray) -> str:
    """Base64 label PNG of ``labels`` [H, W] (:func:`label_image`)."""
    buf = io.BytesIO()
    label_image(labels, "format=label-png (format=json holds any id)").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def label_rle(labels: np.ndarray) -> dict[str, Any]:
    """Run-length encoding of an integer label map [H, W] in column-major order.

    >>> label_rle(np.array([[1, 1], [2, 1]]))
    {'size': [2, 2], 'counts': [1, 1, 2], 'values': [1, 2, 1]}
    """
    flat = np.asarray(labels).ravel(order="F")
    if not flat.size:
        return {"size": [int(s) for s in labels.shape], "counts": [], "values": []}
    starts = np.flatnonzero(np.concatenate([[True], flat[1:] != flat[:-1]]))
    counts = np.diff(np.append(starts, flat.size))
    return {"size": [int(s) for s in labels.shape], "counts": counts.tolist(), "values": flat[starts].tolist()}


def encode_label_map(labels: np.ndarray, encoding: MapEncoding = "rle") -> dict[str, Any]:
    if encoding == "png":
        return {"size": [int(s) for s in labels.shape], "png": label_png(labels)}
    return label_rle(labels)


def label_map(encoded: Mapping[str, Any]) -> np.ndarray:
    """The label map [H, W] int32 of :func:`encode_label_map`'s encoding (RLE or PNG).

    >>> label_map(label_rle(np.array([[3, 0], [3, 3]]))).tolist()
    [[3, 0], [3, 3]]
    """
    h, w = (int(s) for s in encoded["size"])
    if "png" in encoded:
        with Image.open(io.BytesIO(base64.b64decode(encoded["png"]))) as img:
            return np.asarray(img).astype(np.int32)
    counts = np.asarray(encoded["counts"], np.int64)
    values = np.asarray(encoded["values"], np.int32)
    if counts.sum() != h * w or len(counts) != len(values):
        raise InvalidInputError(f"a label-map RLE of size {h}x{w} has {counts.sum()} pixels in its runs")
    return np.repeat(values, counts).reshape((h, w), order="F")


# The result record -------------------------------------------------------------------------------
def evidence_record(evidence: Evidence) -> dict[str, Any]:
    return {
        "base_class": evidence.base_class,
        "retrieved_class": evidence.retrieved_class,
        "retrieval_confidence": round(evidence.retrieval_confidence, 6),
        "neighbours": [[name, round(sim, 6)] for name, sim in evidence.neighbours],
        "changed": evidence.changed,
    }


def segment_record(result: Result, segment: PanopticSegment, *, masks: bool = False) -> dict[str, Any]:
    """One panoptic segment of ``result``; ``masks`` adds its mask's COCO RLE as ``segmentation``."""
    mask = result.panoptic == segment.id
    record = {
        "id": segment.id,
        "class": segment.name,
        "class_id": segment.class_id,
        "score": round(segment.score, 6),
        "area": segment.area,
        "thing": segment.is_thing,
        "bbox": bbox(mask),
        "evidence": evidence_record(segment.evidence),
    }
    if masks:
        record["segmentation"] = rle(mask)
    return record


def instance_record(instance: InstanceMask, *, masks: bool = False) -> dict[str, Any]:
    record: dict[str, Any] = {
        "class_id": instance.class_id,
        "class": instance.name,
        "score": round(instance.score, 6),
        "area": int(instance.mask.sum()),
        "bbox": bbox(instance.mask),
    }
    if masks:
        record["segmentation"] = rle(instance.mask)
    return record


def result_record(result: Result, *, maps: MapEncoding | None = None, masks: bool = False) -> dict[str, Any]:
    """``result`` as the record of this module's docstring: with the label maps encoded as
    ``maps`` (none by default: files hold them) and, with ``masks``, each mask's COCO RLE."""
    h, w = result.semantic.shape
    top = max(result.classes, default=-1)
    record: dict[str, Any] = {"image": result.name} if result.name else {}
    record.update(height=int(h), width=int(w), classes=[result.classes.get(i) for i in range(top + 1)])
    if maps is not None:
        record.update(
            semantic=encode_label_map(result.semantic, maps), panoptic=encode_label_map(result.panoptic, maps)
        )
    record["segments"] = [segment_record(result, s, masks=masks) for s in result.segments]
    record["instances"] = [instance_record(i, masks=masks) for i in result.instances]
    record["timings"] = {k: round(v, 3) for k, v in result.timings.items()}
    return record


def result_from_record(record: Mapping[str, Any]) -> Result:
    """The ``Result`` of a record with label maps (an HTTP reply). An instance's mask is its
    ``segmentation``, so instances need a record made with masks."""
    try:
        semantic, panoptic = label_map(record["semantic"]), label_map(record["panoptic"])
        segments = [
            PanopticSegment(
                id=s["id"],
                class_id=s["class_id"],
                name=s["class"],
                score=s["score"],
                area=s["area"],
                is_thing=s["thing"],
                evidence=_evidence(s["evidence"]),
            )
            for s in record["segments"]
        ]
        instances = [
            InstanceMask(i["class_id"], i["class"], i["score"], _instance_mask(i)) for i in record.get("instances", [])
        ]
        classes = {i: name for i, name in enumerate(record["classes"]) if name is not None}
        timings = {str(k): float(v) for k, v in record.get("timings", {}).items()}
    except (KeyError, TypeError) as exc:
        raise InvalidInputError(f"a result record lacks or mistypes {exc}") from None
    return Result(semantic, panoptic, segments, classes, timings, str(record.get("image", "")), instances)


def _evidence(data: Mapping[str, Any]) -> Evidence:
    neighbours = tuple((str(name), float(sim)) for name, sim in data["neighbours"])
    return Evidence(
        data["base_class"], data["retrieved_class"], float(data["retrieval_confidence"]), neighbours, data["changed"]
    )


def _instance_mask(data: Mapping[str, Any]) -> np.ndarray:
    if "segmentation" not in data:
        raise InvalidInputError("an instance without 'segmentation': ask for masks (format=coco-instances)")
    return rle_mask(data["segmentation"])


# COCO --------------------------------------------------------------------------------------------
def coco_instances(result: Result, image_id: int) -> list[dict[str, Any]]:
    """The COCO instance results of one image (``Result.instances``, from ``instance=True``)."""
    return [
        {
            "image_id": image_id,
            "category_id": i.class_id + COCO_ID_OFFSET,
            "segmentation": rle(i.mask),
            "score": float(i.score),
            "bbox": bbox(i.mask),
        }
        for i in result.instances
    ]


def panoptic_rgb(panoptic: np.ndarray) -> np.ndarray:
    """Segment ids [H, W] -> uint8 [H, W, 3] with ``id = R + 256 G + 256^2 B``."""
    ids = panoptic.astype(np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def coco_panoptic(result: Result, image_id: int, file_name: str) -> tuple[np.ndarray, dict[str, Any]]:
    """(the RGB-encoded PNG pixels, the annotation with ``segments_info``) of one image."""
    segments = [
        {
            "id": s.id,
            "category_id": s.class_id + COCO_ID_OFFSET,
            "iscrowd": 0,
            "area": s.area,
            "bbox": bbox(result.panoptic == s.id),
            "score": round(s.score, 6),
        }
        for s in result.segments
    ]
    return panoptic_rgb(result.panoptic), {"image_id": image_id, "file_name": file_name, "segments_info": segments}


def categories(classes: Iterable[ClassInfo]) -> list[dict[str, Any]]:
    """COCO ``categories`` of a vocabulary: id (the class id + 1), name, and whether it is a thing."""
    return [
        {"id": c.id + COCO_ID_OFFSET, "name": c.name, "isthing": int(bool(c.thing))}
        for c in sorted(classes, key=lambda c: c.id)
    ]


class SeenClasses:
    """The classes named in the results seen so far, each a thing where one of its segments is:
    the COCO categories of results written without their database at hand."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.things: set[int] = set()

    def see(self, result: Result) -> None:
        self.names.update(result.classes)
        self.things |= {s.class_id for s in result.segments if s.is_thing}

    def classes(self) -> list[ClassInfo]:
        return [ClassInfo(i, name, thing=i in self.things) for i, name in sorted(self.names.items())]


# Files -------------------------------------------------------------------------------------------
def write_json(path: Path, payload: object, indent: int | None = None) -> None:
    """Atomically (a new file renamed over ``path``): a link planted at the name is replaced, never followed."""
    from knnclip.engine.fsutil import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(payload, indent=indent).encode())


class ResultWriter:
    """Writes results into ``out`` in the chosen :data:`FORMATS`, per result ``STEM``:

    - ``json``: ``STEM.json``, the result record;
    - ``label-png``: ``STEM.semantic.png`` and, with ``panoptic``, ``STEM.panoptic.png``;
    - ``coco-panoptic``: ``panoptic/STEM.png``; ``close`` writes ``panoptic.json``;
    - ``coco-instances``: ``close`` writes ``coco_instances.json`` and ``coco_images.json``;
    - with ``overlay``: ``STEM`` + ``overlay_suffix`` (``STEM.overlay.png``), the labelled picture
      (:func:`knnclip.engine.render.plot`, with the retrieval evidence under it with ``evidence``).

    ``knnclip segment`` writes images through it, ``Result.save`` one result, and a video's frame
    PNGs go through one too.
    """

    def __init__(
        self,
        out: Path,
        formats: Iterable[str] = ("json", "label-png"),
        *,
        panoptic: bool = False,
        overlay: bool = False,
        overlay_suffix: str = ".overlay.png",
        evidence: bool = False,
    ) -> None:
        self.formats = set(formats)
        unknown = self.formats - set(FORMATS)
        if unknown:
            raise InvalidInputError(f"unknown formats {sorted(unknown)}: choose from {', '.join(FORMATS)}")
        self.out, self.panoptic, self.overlay = Path(out), panoptic, overlay
        self.overlay_suffix, self.evidence = overlay_suffix, evidence
        self.out.mkdir(parents=True, exist_ok=True)
        self.seen = SeenClasses()
        self.images: list[dict[str, Any]] = []
        self.instances: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []

    def write(self, stem: str, result: Result, image: np.ndarray | None = None) -> dict[str, Any]:
        """Write one result's files (``image`` [H, W, 3] uint8 for its overlay); returns its record."""
        record = result_record(result)
        out, image_id = self.out, len(self.images) + 1
        if "json" in self.formats:
            write_json(out / f"{stem}.json", record, indent=1)
        if "label-png" in self.formats:
            write_label_png(result.semantic, out / f"{stem}.semantic.png")
            if self.panoptic:
                write_label_png(result.panoptic, out / f"{stem}.panoptic.png")
        if "coco-panoptic" in self.formats:
            rgb, annotation = coco_panoptic(result, image_id, f"{stem}.png")
            (out / "panoptic").mkdir(exist_ok=True)
            save_png(Image.fromarray(rgb), out / "panoptic" / f"{stem}.png")
            self.annotations.append(annotation)
        if self.overlay and image is not None:
            picture = plot(image, result, evidence=self.evidence)
            save_png(Image.fromarray(picture), out / f"{stem}{self.overlay_suffix}")
        if "coco-instances" in self.formats:
            self.instances += coco_instances(result, image_id)
        h, w = result.semantic.shape
        name = Path(result.name).name or stem
        self.images.append({"id": image_id, "file_name": name, "height": int(h), "width": int(w)})
        self.seen.see(result)
        return record

    def close(self, classes: Iterable[ClassInfo] | None = None) -> None:
        """Write the COCO files that cover every image, with ``classes`` (the vocabulary's) as
        their categories; by default the classes the results named."""
        cats = categories(self.seen.classes() if classes is None else classes)
        if "coco-instances" in self.formats:
            write_json(self.out / "coco_instances.json", self.instances)
            write_json(self.out / "coco_images.json", {"images": self.images, "categories": cats})
        if "coco-panoptic" in self.formats:
            write_json(
                self.out / "panoptic.json", {"images": self.images, "annotations": self.annotations, "categories": cats}
            )
