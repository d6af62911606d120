"""What travels over HTTP besides results: request images and masks in, errors as status codes.
A result goes out as :mod:`knnclip.engine.formats`' record (:func:`result_payload`)."""

from __future__ import annotations

import io
import json
import math
import zipfile
from typing import Any

import numpy as np
from PIL import Image

from knnclip.engine import errors
from knnclip.engine.formats import reply_encoding, result_record
from knnclip.engine.pipeline.results import Result


def result_payload(result: Result, fmt: str = "json") -> dict[str, Any]:
    """The JSON reply of ``POST /v1/segment`` (docs/serving.md): the result record with its
    label maps, encoded as ``fmt`` asks."""
    maps, masks = reply_encoding(fmt)
    record = result_record(result, maps=maps, masks=masks)
    record.pop("image", None)  # the server was sent bytes: the name is only a place in its batch
    return record


# Requests --------------------------------------------------------------------------------------
MAX_PNG_CHUNKS = 256  # chunks before the image data; real files have a handful


def image_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the image's header, refused past ``max_pixels`` before any decoding.
    A PNG is first walked chunk by chunk (lengths only): one with hundreds of thousands of text
    chunks would keep Pillow's header reader busy for seconds."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        _check_png_chunks(data)
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


MAX_JSON_DEPTH = 4  # classes and things are a list or an object of names: nothing deeper is meaningful


def _check_png_chunks(data: bytes) -> None:
    offset, chunks = 8, 0
    while offset + 8 <= len(data):
        length = int.from_bytes(data[offset : offset + 4], "big")
        kind = data[offset + 4 : offset + 8]
        if kind in (b"IDAT", b"IEND"):
            return
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise errors.InvalidInputError(
                f"the PNG has more than {MAX_PNG_CHUNKS} chunks before its image data; re-save it without metadata"
            )
        offset += 12 + length


def parse_names(text: str | None, what: str) -> Any:
    """A JSON form field (``classes``, ``things``); a plain ``a,b`` list is taken for ``classes``.
    Nesting is refused before parsing (deep nesting would exhaust Python's recursion)."""
    if text is None or not text.strip():
        return None
    if _json_depth(text) > MAX_JSON_DEPTH:
        raise errors.InvalidInputError(f"the form field {what!r} is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if what == "classes":
            return [name.strip() for name in text.split(",")]
        raise errors.InvalidInputError(f"the form field {what!r} is not JSON") from None


def _json_depth(text: str) -> int:
    """The deepest bracket nesting of ``text`` outside strings, in one linear scan."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def example_masks(
    data: bytes, filename: str, classes: Any, size: tuple[int, int], max_bytes: int | None = None
) -> tuple[np.ndarray, list[str]]:
    """Boolean masks [N, H, W] and their class names from ``POST /v1/examples``' ``masks`` part,
    for an image of ``size`` (width, height).

    A PNG (or any image) holds one class index per pixel: pixel value ``v`` is ``classes[v]``
    (a list, ``null`` to ignore) or ``classes[str(v)]`` (an object); values it does not name are
    ignored. An ``.npz`` holds ``masks`` [N, H, W] with ``classes`` naming each, or ``labels``
    [H, W] read like the PNG. The N x H x W masks are refused (``OutOfMemoryError``) past
    ``max_bytes`` (default: post-processing's mask budget) before they are made, and an .npz
    member past it before it is decompressed.
    """
    from knnclip.engine.pipeline.postprocess import FULL_MASKS_BUDGET

    budget = FULL_MASKS_BUDGET if max_bytes is None else max_bytes
    width, height = size
    if data[:4] == b"PK\x03\x04" or filename.lower().endswith(".npz"):
        arrays = _npz(data, budget)
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
    return _masks_from_labels(labels, classes, budget)


def _npz_masks(masks: np.ndarray, classes: Any, shape: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
    if masks.ndim not in (2, 3):
        raise errors.InvalidInputError(f"'masks' must be [N, H, W] or [H, W], got {masks.ndim} dimensions")
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
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        _check_png_chunks(data)
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


def _masks_from_labels(labels: np.ndarray, classes: Any, budget: int) -> tuple[np.ndarray, list[str]]:
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
    _within_budget(len(present) * labels.size, budget, f"{len(present)} masks of {labels.shape[1]}x{labels.shape[0]}")
    return np.stack([labels == v for v in present]), [names[v] for v in present]


def _within_budget(nbytes: int, budget: int, what: str) -> None:
    if nbytes > budget:
        raise errors.OutOfMemoryError(
            f"{what} would take {nbytes >> 20} MiB, over this server's budget of {budget >> 20} MiB: "
            "send fewer masks per request, or a smaller image"
        )


def _npz(data: bytes, budget: int) -> dict[str, np.ndarray]:
    """The .npy members of an .npz, each refused past ``budget`` bytes from its header, before
    its data is decompressed; pickled objects and members that are not .npy are refused."""
    arrays = {}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
            if len(members) > 8:
                raise errors.InvalidInputError(f"the .npz holds {len(members)} members; it needs 'masks' or 'labels'")
            for member in members:
                if not member.filename.endswith(".npy"):
                    raise errors.InvalidInputError(f"the .npz member {member.filename!r} is not a .npy array")
                with archive.open(member) as stream:
                    version = np.lib.format.read_magic(stream)
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read_header(stream, max_header_size=10_000)
                    if dtype.hasobject:
                        raise errors.InvalidInputError(f"the .npz member {member.filename!r} holds Python objects")
                    _within_budget(math.prod(shape) * dtype.itemsize, budget, f"the .npz member {member.filename!r}")
                with archive.open(member) as stream:
                    arrays[member.filename[: -len(".npy")]] = np.lib.format.read_array(stream, allow_pickle=False)
    except errors.KnnclipError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, NotImplementedError) as exc:
        raise errors.InvalidInputError(f"the masks part is not a readable .npz ({type(exc).__name__})") from None
    return arrays


def _check_size(shape: tuple[int, ...], expected: tuple[int, int]) -> None:
    if tuple(shape) != expected:
        raise errors.InvalidInputError(f"the masks are {shape[1]}x{shape[0]}, the image {expected[1]}x{expected[0]}")


# Errors ----------------------------------------------------------------------------------------
def error_status(exc: BaseException) -> int:
    """The HTTP status of a library error: the client's fault 4xx, the server's 5xx."""
    if isinstance(exc, (errors.UnknownClassError, errors.UnknownEntryError)):
        return 404
    if isinstance(exc, errors.OutOfMemoryError):
        return 413
    if isinstance(exc, errors.DatabaseBusyError):
        return 503
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
