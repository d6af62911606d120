"""Pictures of results (Pillow and NumPy): :func:`plot`, each segment filled with its class's
colour, outlined and labelled with its class and score, optionally with the retrieval evidence
under the image; matplotlib for the optional plots of reports."""

from __future__ import annotations

import colorsys
import os
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from knnclip.engine.pipeline.results import Result

_LEGEND_ROW = 14
_LABEL_BACKGROUND = (24, 24, 24)
_TEXT = (235, 235, 235)
Box = tuple[int, int, int, int]  # left, top, right, bottom (exclusive)
_LABELLED_FRACTION = 0.01  # a class outside the segments gets a label where it covers this much


def class_colour(class_id: int) -> tuple[int, int, int]:
    """A stable, well-spread colour per class id (golden-ratio hues)."""
    hue = (class_id * 0.6180339887) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _outline(ids: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour belongs to another segment."""
    edge = np.zeros(ids.shape, bool)
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    edge[:-1, :] |= ids[:-1, :] != ids[1:, :]
    return edge


def plot(image: np.ndarray, result: Result, *, evidence: bool = False, alpha: float = 0.5) -> np.ndarray:
    """``image`` uint8 [H, W, 3] with ``result`` drawn on it -> uint8 RGB [H, W, 3] (taller with
    ``evidence``).

    Each panoptic segment is filled with its class's colour (``alpha`` of it over the image) and
    outlined in white; a label, its class and score on a dark box, stands in its middle. Pixels
    in no segment take their semantic class's colour, and each such class covering 1% of the
    image is labelled by name (every class, when the panoptic inference was skipped). ``evidence`` adds a
    panel underneath: per segment, FC-CLIP's class, the retrieved class and its confidence, and
    the nearest neighbours.
    """
    semantic, panoptic = result.semantic, result.panoptic
    if image.shape[:2] != semantic.shape:
        raise ValueError(f"the image is {image.shape[:2]}, the result {semantic.shape}")
    # colour of each pixel's class: its segment's, else the semantic map's
    class_of = semantic.astype(np.int64)
    owner = {s.id: s.class_id for s in result.segments}
    if owner:
        lut = np.full(int(panoptic.max(initial=0)) + 1, -1, np.int64)
        for segment_id, class_id in owner.items():
            if segment_id < len(lut):
                lut[segment_id] = class_id
        from_segment = lut[np.clip(panoptic, 0, len(lut) - 1)]
        class_of = np.where((panoptic > 0) & (from_segment >= 0), from_segment, class_of)
    present = [int(c) for c in np.unique(class_of) if int(c) >= 0]
    colours = np.zeros((max([*present, 0]) + 1, 3), np.float32)
    for c in present:
        colours[c] = class_colour(c)
    blended = image.astype(np.float32) * (1 - alpha) + colours[np.clip(class_of, 0, len(colours) - 1)] * alpha
    blended[_outline(panoptic if owner else semantic)] = 255
    picture = Image.fromarray(blended.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    labels = [(panoptic == s.id, f"{s.name} {s.score:.2f}") for s in result.segments]
    void = panoptic == 0 if owner else np.ones(semantic.shape, bool)
    for c in np.unique(semantic[void]).tolist():  # classes outside any segment, by name
        region = void & (semantic == c)
        if region.sum() >= _LABELLED_FRACTION * semantic.size:
            labels.append((region, result.classes.get(c, str(c))))
    placed: list[Box] = []
    for mask, text in labels:
        _label(draw, picture.size, mask, text, placed)
    if evidence and result.segments:
        picture = _with_evidence(picture, result)
    return np.asarray(picture)


def _label(draw: ImageDraw.ImageDraw, size: tuple[int, int], mask: np.ndarray, text: str, placed: list[Box]) -> None:
    """``text`` on a dark box centred on a pixel in the middle of ``mask`` (the median pixel of its
    median row), kept inside the image and moved down past the labels already ``placed``."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return
    row = int(np.median(ys))
    in_row = np.sort(xs[ys == row])
    cx = int(in_row[len(in_row) // 2]) if len(in_row) else int(np.median(xs))
    left, top, right, bottom = draw.textbbox((0, 0), text)
    width, height = int(right - left) + 4, int(bottom - top) + 2
    x = int(np.clip(cx - width // 2, 0, max(size[0] - width, 0)))
    y = int(np.clip(row - height // 2, 0, max(size[1] - height, 0)))
    for _ in range(len(placed)):
        hit = [b for b in placed if x < b[2] and b[0] < x + width and y < b[3] and b[1] < y + height]
        if not hit:
            break
        y = min(max(b[3] for b in hit), max(size[1] - height, 0))
    placed.append((x, y, x + width, y + height))
    draw.rectangle([x, y, x + width - 1, y + height - 1], fill=_LABEL_BACKGROUND)
    draw.text((x + 2 - left, y + 1 - top), text, fill=_TEXT)


def _with_evidence(picture: Image.Image, result: Result) -> Image.Image:
    lines = []
    for s in result.segments:
        e = s.evidence
        retrieved = f"{e.retrieved_class} ({e.retrieval_confidence:.2f})" if e.retrieved_class else "none"
        nearest = ", ".join(f"{name} {sim:.2f}" for name, sim in e.neighbours[:3]) or "-"
        change = " -> changed" if e.changed else ""
        lines.append(f"{s.name}: FC-CLIP {e.base_class}, retrieved {retrieved}{change}; nearest {nearest}")
    w, h = picture.size
    canvas = Image.new("RGB", (w, h + _LEGEND_ROW * len(lines) + 6), _LABEL_BACKGROUND)
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        y = h + 3 + i * _LEGEND_ROW
        draw.rectangle([4, y + 2, 13, y + 11], fill=class_colour(result.segments[i].class_id))
        draw.text((17, y), line, fill=_TEXT)
    return canvas


def save_png(picture: Image.Image, path: str | os.PathLike[str]) -> None:
    """Write a PNG atomically."""
    from knnclip.engine.fsutil import atomic_path

    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None where matplotlib is not installed (plots are
    optional extras beside the JSON and Markdown that every report writes)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
