"""The parity fixtures in tests/fixtures/, as the files the loaders read.

DINOv2's folder is used as it is. FC-CLIP's checkpoints are kept without the unused rows of CLIP's
token embedding (tests/fixtures/reduce.py says why); ``fixture_dir`` rebuilds the official
``checkpoint.pth`` once per process in a temporary folder, beside links to the other files.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TOKEN_TABLE = "backbone.clip_model.token_embedding.weight"


@functools.cache
def _scratch() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="knnclip-fixtures-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


@functools.cache
def fixture_dir(name: str) -> Path:
    """The folder of fixture ``name`` (``dinov2``, ``fcclip``, ``fcclip_resize``) with checkpoint.pth."""
    source = FIXTURES / name
    if not (source / "io.npz").is_file():
        raise FileNotFoundError(f"the parity fixture {name!r} is missing from {source}")
    if (source / "checkpoint.pth").is_file():
        return source
    import torch

    weights = np.load(source / "weights.npz")
    token_rows = np.load(source / "token_rows.npz")
    table = np.zeros(tuple(token_rows["shape"]), np.float32)
    table[token_rows["ids"]] = token_rows["rows"]
    tensors = {TOKEN_TABLE: table, **{key: weights[key] for key in weights.files}}
    order = json.loads((source / "key_order.json").read_text())
    target = _scratch() / name
    target.mkdir()
    torch.save({key: torch.from_numpy(tensors[key]) for key in order}, target / "checkpoint.pth")
    for file in ("config.json", "io.npz", "README.md"):
        (target / file).symlink_to(source / file)
    return target
