"""What travels over HTTP: request images and masks in, results out, errors as status codes.

Label maps (semantic class ids, panoptic segment ids) travel run-length encoded in COCO's order
(column-major, runs from the top-left pixel down each column): ``{"size": [h, w], "counts":
[run lengths], "values": [the id of each run]}``. COCO's own RLE is binary; a label map needs the
value of each run, hence ``values``. ``format=png`` sends a base64 PNG instead (8-bit when every id
fits, else 16-bit) and ``format=coco`` adds pycocotools' RLE of each segment's mask.
"""

from __future__ import annotations

import base64
import io
import json
import zipfile
from typing import Any

import numpy as np
from PIL import Image

from knnclip.engine import errors
from knnclip.engine.pipeline.results import Result, bbox

FORMATS = ("json", "png", "coco")


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


def label_map(encoded: dict[str, Any]) -> np.ndarray:
    """The label map [H, W] int32 of :func:`label_rle`'s or ``format=png``'s encoding.

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
        raise errors.InvalidInputError(f"a label-map RLE of size {h}x{w} has {counts.sum()} pixels in its runs")
    return np.repeat(values, counts).reshape((h, w), order="F")


def label_png(labels: np.ndarray) -> str:
    """Base64 PNG of non-negative ids: 8-bit where every id fits, else 16-bit."""
    top = int(labels.max(initial=0))
    buf = io.BytesIO()
    Image.fromarray(labels.astype(np.uint8 if top <= 255 else np.uint16)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _encode_map(labels: np.ndarray, fmt: str) -> dict[str, Any]:
    if fmt == "png":
        return {"size": [int(s) for s in labels.shape], "png": label_png(labels)}
    return label_rle(labels)


def result_payload(result: Result, fmt: str = "json") -> dict[str, Any]:
    """The JSON reply of ``POST /v1/segment`` (docs/serving.md)."""
    if fmt not in FORMATS:
        raise errors.InvalidInputError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    rle = _coco_rle() if fmt == "coco" else None
    top = max(result.classes, default=-1)
    segments = []
    for s in result.segments:
        mask = result.panoptic == s.id
        seg: dict[str, Any] = {
            "id": s.id, "class": s.name, "class_id": s.class_id, "score": round(s.score, 6), "area": s.area,
            "thing": s.is_thing, "bbox": bbox(mask), "evidence": s.to_json()["evidence"],
        }  # fmt: skip
        if rle is not None:
            seg["segmentation"] = rle(mask)
        segments.append(seg)
    instances = []
    for inst in result.instances:
        item = inst.to_json()
        item["class"] = item.pop("name")
        if rle is not None:
            item["segmentation"] = rle(inst.mask)
        instances.append(item)
    h, w = result.semantic.shape
    return {
        "height": int(h), "width": int(w), "classes": [result.classes.get(i) for i in range(top + 1)],
        "semantic": _encode_map(result.semantic, fmt), "panoptic": _encode_map(result.panoptic, fmt),
        "segments": segments, "instances": instances,
        "timings": {k: round(v, 3) for k, v in result.timings.items()},
    }  # fmt: skip


def _coco_rle() -> Any:
    from knnclip.engine.formats import rle

    return rle


# Requests --------------------------------------------------------------------------------------
def image_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the image's header, refused past ``max_pixels`` before any decoding."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise errors.InvalidInputError(f"the request body is not a readable image ({type(exc).__name__})") from None
    if width * height > max_pixels:
        raise errors.InvalidInputError(
            f"the image is {width}x{height}, larger than this server's limit of {max_pixels} pixels; downscale it"
        )
    return width, height


def parse_names(text: str | None, what: str) -> Any:
    """A JSON form field (``classes``, ``things``); a plain ``a,b`` list is taken for ``classes``."""
    if text is None or not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if what == "classes":
            return [name.strip() for name in text.split(",")]
        raise errors.InvalidInputError(f"the form field {what!r} is not JSON") from None


def example_masks(data: bytes, filename: str, classes: Any, size: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
    """Boolean masks [N, H, W] and their class names from ``POST /v1/examples``' ``masks`` part,
    for an image of ``size`` (width, height).

    A PNG (or any image) holds one class index per pixel: pixel value ``v`` is ``classes[v]``
    (a list, ``null`` to ignore) or ``classes[str(v)]`` (an object); values it does not name are
    ignored. An ``.npz`` holds ``masks`` [N, H, W] with ``classes`` naming each, or ``labels``
    [H, W] read like the PNG.
    """
    width, height = size
    if data[:4] == b"PK\x03\x04" or filename.lower().endswith(".npz"):
        arrays = _npz(data)
        if "masks" in arrays:
            return _npz_masks(arrays["masks"], classes, (height, width))
        if "labels" not in arrays:
            raise errors.InvalidInputError("an .npz of examples holds 'masks' [N, H, W] or 'labels' [H, W]")
        labels = arrays["labels"]
        if labels.ndim != 2 or labels.dtype.kind not in "iu":
            raise errors.InvalidInputError(f"'labels' must be an integer [H, W] map, got {labels.dtype} {labels.shape}")
    else:
        labels = _png_labels(data, (width, height))
    _check_size(labels.shape, (height, width))
    return _masks_from_labels(labels, classes)


def _npz_masks(masks: np.ndarray, classes: Any, shape: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
    if masks.ndim == 2:
        masks = masks[None]
    n = len(masks)
    if not isinstance(classes, list) or len(classes) != n or not all(isinstance(c, str) for c in classes):
        raise errors.InvalidInputError(f"an .npz of {n} masks needs 'classes': a list of {n} names")
    if masks.dtype != bool:
        raise errors.InvalidInputError(f"the masks in the .npz must be boolean, got {masks.dtype}")
    _check_size(masks.shape[-2:], shape)
    return masks, list(classes)


def _png_labels(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """The class indices of a one-channel PNG, its size checked before it is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.size != size:
                raise errors.InvalidInputError(f"the masks are {img.width}x{img.height}, the image {size[0]}x{size[1]}")
            labels = np.asarray(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        kind = type(exc).__name__
        raise errors.InvalidInputError(f"the masks part is not a readable PNG or .npz ({kind})") from None
    if labels.ndim != 2:
        raise errors.InvalidInputError("the masks PNG must have one channel of class indices (mode L or I;16)")
    return labels


def _masks_from_labels(labels: np.ndarray, classes: Any) -> tuple[np.ndarray, list[str]]:
    if isinstance(classes, list):
        names = {v: c for v, c in enumerate(classes) if c}
    elif isinstance(classes, dict):
        try:
            names = {int(v): c for v, c in classes.items() if c}
        except ValueError:
            raise errors.InvalidInputError("the keys of 'classes' must be the mask's pixel values") from None
    else:
        raise errors.InvalidInputError("'classes' names the masks' pixel values: a JSON list or object")
    if not all(isinstance(c, str) for c in names.values()):
        raise errors.InvalidInputError("every entry of 'classes' must be a class name (or null)")
    present = [v for v in np.unique(labels).tolist() if v in names]
    if not present:
        raise errors.InvalidInputError("no pixel of the masks has a value that 'classes' names")
    return np.stack([labels == v for v in present]), [names[v] for v in present]


def _npz(data: bytes) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise errors.InvalidInputError(f"the masks part is not a readable .npz ({type(exc).__name__})") from None


def _check_size(shape: tuple[int, ...], expected: tuple[int, int]) -> None:
    if tuple(shape) != expected:
        raise errors.InvalidInputError(f"the masks are {shape[1]}x{shape[0]}, the image {expected[1]}x{expected[0]}")


# Errors ----------------------------------------------------------------------------------------
def error_status(exc: BaseException) -> int:
    """The HTTP status of a library error: the client's fault 4xx, the server's 5xx."""
    if isinstance(exc, errors.UnknownClassError):
        return 404
    if isinstance(exc, errors.OutOfMemoryError):
        return 413
    if isinstance(exc, (errors.ReadOnlyDatabaseError, errors.DatabaseLockedError)):
        return 409
    if isinstance(exc, (errors.InvalidInputError, errors.DatasetError)):
        return 400
    if isinstance(exc, errors.DatabaseWriteError):
        return 507
    return 500


def error_body(exc: BaseException, status: int | None = None) -> dict[str, Any]:
    """``{"error": {"type", "message", "status"}}``; the type is the library's exception class."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    return {"error": {"type": type(exc).__name__, "message": message, "status": status or error_status(exc)}}
