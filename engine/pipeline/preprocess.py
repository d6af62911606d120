"""Images in, model inputs out: decoding with checks, FC-CLIP's test-time resize and padding,
DINOv2's fixed-size input. NumPy and Pillow only.

Every function takes and returns uint8 RGB ``[H, W, 3]`` arrays until the final normalisation.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps

from knnclip.engine.errors import InvalidInputError

# Decoding refuses images above this many pixels (Pillow's own bomb limit is 89 Mpx, and warns
# rather than refuses below twice that). 16k x 16k covers any camera; raise it with
# KNNCLIP_MAX_IMAGE_PIXELS where larger inputs are expected.
MAX_IMAGE_PIXELS = int(os.environ.get("KNNCLIP_MAX_IMAGE_PIXELS", 16384 * 16384))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageInput = str | os.PathLike[str] | bytes | np.ndarray | Image.Image


def load_image(image: ImageInput, name: str | None = None) -> np.ndarray:
    """Any supported input -> uint8 RGB ``[H, W, 3]``, EXIF orientation applied.

    Accepts a path, encoded bytes, a PIL image, or an array (``[H, W, 3]`` uint8 RGB, or
    ``[H, W]`` grayscale; float arrays are refused since their scale is ambiguous).
    """
    label = name or (str(image) if isinstance(image, (str, os.PathLike)) else type(image).__name__)
    if isinstance(image, np.ndarray):
        return _check_array(image, label)
    if isinstance(image, Image.Image):
        return _from_pil(image, label)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(image)), label)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise InvalidInputError(f"{label}: no such image file")
        with path.open("rb") as f:
            return _decode(f, label)
    raise InvalidInputError(f"{label}: an image is a path, bytes, a PIL image or a uint8 array")


def _decode(stream: IO[bytes], label: str) -> np.ndarray:
    try:
        with Image.open(stream) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InvalidInputError(
                    f"{label}: {width}x{height} is larger than the limit of {MAX_IMAGE_PIXELS} pixels; "
                    "downscale it, or raise KNNCLIP_MAX_IMAGE_PIXELS"
                )
            img.load()
            return _from_pil(img, label)
    except InvalidInputError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # Pillow signals truncated or undecodable data with OSError (and SyntaxError for some formats).
        raise InvalidInputError(f"{label}: not a readable image ({type(exc).__name__}: {exc})") from None


def _from_pil(img: Image.Image, label: str) -> np.ndarray:
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit grayscale: Pillow's convert("RGB") clips at 255; scale the full range instead.
        wide = np.asarray(img).astype(np.int64)
        gray = (np.clip(wide, 0, 65535) // 257).astype(np.uint8)
        return _check_array(gray, label)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return _check_array(np.asarray(img), label)


def _check_array(array: np.ndarray, label: str) -> np.ndarray:
    if array.dtype != np.uint8:
        raise InvalidInputError(
            f"{label}: image arrays are uint8 RGB [H, W, 3], got {array.dtype}; convert with "
            "(x * 255).round().clip(0, 255).astype(np.uint8) if it holds values in [0, 1]"
        )
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise InvalidInputError(f"{label}: image arrays are [H, W, 3] RGB, got shape {array.shape}")
    height, width = array.shape[:2]
    if height == 0 or width == 0:
        raise InvalidInputError(f"{label}: empty image ({height}x{width})")
    if height * width > MAX_IMAGE_PIXELS:
        raise InvalidInputError(f"{label}: {width}x{height} is larger than the limit of {MAX_IMAGE_PIXELS} pixels")
    return np.ascontiguousarray(array)


def shortest_edge_size(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2 ``ResizeShortestEdge``: scale the short side to ``short`` unless the long side
    would exceed ``max_size``; round half up. A side never becomes 0 (an extreme aspect ratio such
    as 1x5000 keeps one row, where detectron2 would produce an empty image).

    >>> shortest_edge_size(480, 640, 800, 1333)
    (800, 1067)
    >>> shortest_edge_size(1, 5000, 800, 1333)
    (1, 1333)
    """
    scale = short / min(height, width)
    new_h, new_w = (short, scale * width) if height < width else (scale * height, short)
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


def resize(image: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> ``size`` (H, W) with Pillow (as detectron2's ResizeTransform does)."""
    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), resample))


@dataclass(frozen=True)
class FCCLIPInput:
    """A normalised, padded batch of one and the sizes needed to map outputs back.

    ``tensor`` float32 ``[1, 3, Hp, Wp]``; ``resized`` the (H, W) the model saw before padding;
    ``original`` the (H, W) of the input image.
    """

    tensor: np.ndarray
    resized: tuple[int, int]
    original: tuple[int, int]

    @property
    def padded(self) -> tuple[int, int]:
        return int(self.tensor.shape[2]), int(self.tensor.shape[3])


def fcclip_sizes(
    original: tuple[int, int],
    *,
    short: int | None = 800,
    max_size: int = 1333,
    divisibility: int = 32,
    pad_to: tuple[int, int] | None = None,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resized, padded) (H, W) of FC-CLIP's input for an image of size ``original``: see
    :func:`fcclip_input`.

    >>> fcclip_sizes((480, 640))
    ((800, 1067), (800, 1088))
    >>> fcclip_sizes((480, 640), pad_to=(384, 512))
    ((384, 512), (384, 512))
    """
    size = original if short is None else shortest_edge_size(*original, short, max_size)
    if pad_to is None:
        pad_to = (-(-size[0] // divisibility) * divisibility, -(-size[1] // divisibility) * divisibility)
    elif size[0] > pad_to[0] or size[1] > pad_to[1]:  # shrink into the fixed size, keeping the aspect
        scale = min(pad_to[0] / size[0], pad_to[1] / size[1])
        size = (max(1, min(pad_to[0], int(size[0] * scale + 0.5))), max(1, min(pad_to[1], int(size[1] * scale + 0.5))))
    return size, pad_to


def fcclip_input(
    image: np.ndarray,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    *,
    short: int | None = 800,
    max_size: int = 1333,
    divisibility: int = 32,
    pad_to: tuple[int, int] | None = None,
) -> FCCLIPInput:
    """FC-CLIP's test-time input: resize the short side (bilinear, Pillow on uint8; ``short=None``
    keeps the size), normalise with the 0..255-scale ``mean``/``std``, pad bottom and right with 0
    to a multiple of ``divisibility``, or to ``pad_to`` (the fixed size of an exported model; an
    image that would not fit is scaled down further into it, keeping its aspect ratio)."""
    original = (int(image.shape[0]), int(image.shape[1]))
    size, pad_to = fcclip_sizes(original, short=short, max_size=max_size, divisibility=divisibility, pad_to=pad_to)
    resized = resize(image, size, Image.Resampling.BILINEAR)
    tensor = np.zeros((1, 3, *pad_to), dtype=np.float32)
    chw = resized.transpose(2, 0, 1).astype(np.float32)
    mean_, std_ = (np.asarray(v, dtype=np.float32)[:, None, None] for v in (mean, std))
    tensor[0, :, : size[0], : size[1]] = (chw - mean_) / std_
    return FCCLIPInput(tensor, size, original)


def dinov2_input(
    image: np.ndarray,
    size: tuple[int, int] = (518, 518),
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> np.ndarray:
    """DINOv2's input: the whole image resized to ``size`` (bicubic, as DINOv2's evaluation
    transforms) and normalised with the 0..1-scale ``mean`` and ``std`` (its manifest's;
    ImageNet's, which DINOv2 was trained with, by default) -> float32 ``[1, 3, H, W]``."""
    resized = resize(image, size, Image.Resampling.BICUBIC).astype(np.float32) / 255.0
    chw = (resized - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(chw.transpose(2, 0, 1)[None])
