"""A small synthetic labelled dataset: textured objects of several classes on textured
backgrounds, with exact masks. NumPy only; deterministic for a seed.

Each image has a sky above a horizon and one ground class below it (stuff), and one to three
objects (things) painted over them; each class has its own colour and texture, jittered per
image so that recognising a class means generalising, not matching pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = 255
IMAGE_SIZE = (192, 256)  # (height, width) of the synthetic images, and of the demo's FC-CLIP export


@dataclass(frozen=True)
class ClassStyle:
    name: str
    thing: bool
    colour: tuple[int, int, int]
    texture: str  # "gradient", "noise", "speckle", "waves", "stripes", "checker", "dots", "rings"
    shape: str = ""  # things: "circle", "square", "triangle", "diamond", "star"


CLASSES: tuple[ClassStyle, ...] = (
    ClassStyle("sky", False, (110, 160, 235), "gradient"),
    ClassStyle("grass", False, (60, 150, 50), "noise"),
    ClassStyle("sand", False, (220, 200, 140), "speckle"),
    ClassStyle("water", False, (30, 90, 170), "waves"),
    ClassStyle("ball", True, (220, 40, 40), "stripes", "circle"),
    ClassStyle("box", True, (150, 95, 45), "checker", "square"),
    ClassStyle("tree", True, (20, 90, 30), "dots", "triangle"),
    ClassStyle("star", True, (250, 210, 30), "rings", "star"),
)
GROUNDS = ("grass", "sand", "water")


@dataclass(frozen=True)
class Sample:
    """One image: ``image`` uint8 [H, W, 3]; ``labels`` [H, W] class indices into ``CLASSES``;
    ``masks`` [N, H, W] bool, one per segment (stuff regions and object instances), with
    ``names`` their class names."""

    image: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    names: list[str]


def class_index(name: str) -> int:
    return next(i for i, c in enumerate(CLASSES) if c.name == name)


def _texture(style: ClassStyle, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """[h, w, 3] float texture in 0..255 of one class with this image's jitter."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    colour = np.asarray(style.colour, np.float32) + rng.normal(0, 12, 3)
    period = rng.uniform(6, 12)
    phase = rng.uniform(0, 2 * np.pi)
    if style.texture == "gradient":
        pattern = (yy / max(h, 1) - 0.5) * 50
    elif style.texture == "noise":
        pattern = rng.normal(0, 22, (h, w))
    elif style.texture == "speckle":
        pattern = np.where(rng.random((h, w)) < 0.1, -60.0, 0.0) + rng.normal(0, 6, (h, w))
    elif style.texture == "waves":
        pattern = 35 * np.sin(xx / period + 0.6 * np.sin(yy / (2 * period)) + phase)
    elif style.texture == "stripes":
        pattern = np.where(np.sin((xx + yy) / (period / 2) + phase) > 0, 80.0, -40.0)
    elif style.texture == "checker":
        pattern = np.where(((xx // period) + (yy // period)) % 2 == 0, 45.0, -45.0)
    elif style.texture == "dots":
        pattern = np.where(np.hypot(xx % period - period / 2, yy % period - period / 2) < period / 4, 70.0, 0.0)
    else:  # rings
        pattern = 60 * np.sin(np.hypot(xx - w / 2, yy - h / 2) / (period / 3) + phase)
    return np.clip(colour[None, None, :] + pattern[..., None], 0, 255)


def _shape_mask(shape: str, h: int, w: int, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return np.hypot(dx, dy) <= r
    if shape == "square":
        c, s = np.cos(angle), np.sin(angle)
        u, v = c * dx + s * dy, -s * dx + c * dy
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    if shape == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    # five-pointed star: radius varies with the angle around the centre
    theta = np.arctan2(dy, dx) + angle
    boundary = r * (0.55 + 0.45 * np.abs(np.cos(2.5 * theta)))
    return np.hypot(dx, dy) <= boundary


def make_sample(
    rng: np.random.Generator, size: tuple[int, int] = IMAGE_SIZE, objects: tuple[str, ...] = ("ball", "box", "tree")
) -> Sample:
    """One image with a sky, one ground class and 1..3 objects drawn from ``objects``."""
    h, w = size
    image = np.zeros((h, w, 3), np.float32)
    labels = np.full((h, w), IGNORE, np.uint8)
    horizon = int(h * rng.uniform(0.3, 0.55))
    ground = GROUNDS[int(rng.integers(len(GROUNDS)))]
    for name, rows in (("sky", slice(0, horizon)), (ground, slice(horizon, h))):
        style = CLASSES[class_index(name)]
        image[rows] = _texture(style, h, w, rng)[rows]
        labels[rows] = class_index(name)
    instance = np.zeros((h, w), np.int32)  # 0: stuff, k: object k
    things = []
    for k in range(int(rng.integers(1, 4))):
        style = CLASSES[class_index(objects[int(rng.integers(len(objects)))])]
        r = rng.uniform(0.12, 0.22) * min(h, w)
        cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
        region = _shape_mask(style.shape, h, w, cy, cx, r, rng.uniform(0, np.pi))
        image[region] = _texture(style, h, w, rng)[region]
        labels[region] = class_index(style.name)
        instance[region] = k + 1
        things.append(style.name)
    image += rng.normal(0, 4, image.shape)  # sensor noise
    masks, names = [], []
    for name in ("sky", ground):
        m = (labels == class_index(name)) & (instance == 0)
        if m.any():
            masks.append(m)
            names.append(name)
    for k, name in enumerate(things):
        m = instance == k + 1
        if m.any():  # a later object may cover an earlier one entirely
            masks.append(m)
            names.append(name)
    return Sample(np.clip(image, 0, 255).astype(np.uint8), labels, np.stack(masks), names)


def make_split(n: int, seed: int, size: tuple[int, int] = IMAGE_SIZE, objects: tuple[str, ...] = ()) -> list[Sample]:
    """``n`` samples from ``seed``; ``objects`` defaults to every thing class."""
    rng = np.random.default_rng(seed)
    things = objects or tuple(c.name for c in CLASSES if c.thing)
    return [make_sample(rng, size, things) for _ in range(n)]
