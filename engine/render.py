"""Pictures of results: class-coloured overlays with segment outlines and a legend, and a
retrieval-evidence panel for one segment (Pillow and NumPy); matplotlib for the optional plots
of reports."""

from __future__ import annotations

import colorsys
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

_LEGEND_ROW = 14


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


def overlay(
    image: np.ndarray,
    semantic: np.ndarray,
    classes: Mapping[int, str],
    panoptic: np.ndarray | None = None,
    alpha: float = 0.5,
    legend_rows: int | None = None,
) -> Image.Image:
    """``image`` uint8 [H, W, 3] blended with class colours of ``semantic`` [H, W] (class ids),
    outlines of ``panoptic`` segments (or of the semantic regions), and a legend of the classes
    present underneath: as many rows as needed, or exactly ``legend_rows`` (three classes a row,
    the rest left out), so that every frame of a video has the same size."""
    present = [int(c) for c in np.unique(semantic) if int(c) in classes]
    lut = np.zeros((max([*present, 0]) + 1, 3), np.float32)
    for c in present:
        lut[c] = class_colour(c)
    colours = lut[np.clip(semantic, 0, len(lut) - 1)]
    blended = image.astype(np.float32) * (1 - alpha) + colours * alpha
    blended[_outline(panoptic if panoptic is not None else semantic)] = 255
    h, w = semantic.shape
    if legend_rows is not None:
        present = present[: 3 * legend_rows]
    legend_h = _LEGEND_ROW * (((len(present) + 2) // 3) if legend_rows is None else legend_rows) + 6
    canvas = Image.new("RGB", (w, h + legend_h), (24, 24, 24))
    canvas.paste(Image.fromarray(blended.clip(0, 255).astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    column = max(w // 3, 1)
    for i, c in enumerate(present):
        x, y = 4 + (i % 3) * column, h + 3 + (i // 3) * _LEGEND_ROW
        draw.rectangle([x, y + 2, x + 9, y + 11], fill=class_colour(c))
        draw.text((x + 13, y), classes[c][:24], fill=(235, 235, 235))
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
