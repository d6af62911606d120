"""The FC-CLIP parity fixtures, loaded once per variant, and a relative-error helper."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tests.support.fixture_files import fixture_dir


def rel(ours: Any, ref: np.ndarray) -> float:
    """Relative L2 error of ``ours`` (NumPy or torch) against ``ref``, in float64."""
    ours = np.asarray(ours.detach().numpy() if hasattr(ours, "detach") else ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


@dataclass
class Fixture:
    dir: Path
    config: dict[str, Any]
    io: dict[str, np.ndarray]
    model: Any

    @property
    def class_names(self) -> list[str]:
        return self.config["classes"]["names_with_synonyms"]

    @property
    def is_thing(self) -> list[bool]:
        return self.config["classes"]["isthing"]

    @property
    def synonyms_per_class(self) -> list[int]:
        return self.io["num_templates"].tolist()

    @property
    def padded(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.io["input_tensor"].shape[-2:])

    @property
    def resized(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.io["image_size_hw"])

    @property
    def original(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.io["output_size_hw"])


@functools.cache
def load_fixture(name: str) -> Fixture:
    from knnclip.export.fcclip import load_fcclip

    directory = fixture_dir(name)
    config = json.loads((directory / "config.json").read_text())
    model = load_fcclip(directory / "checkpoint.pth", config)
    return Fixture(directory, config, dict(np.load(directory / "io.npz")), model)
