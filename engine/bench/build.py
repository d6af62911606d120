"""The benchmark's presets, and what it runs on: seeded models in the real shapes exported to
ONNX (with their torch weights, for the reference pipeline), synthetic images, and a database of
clustered embeddings. Speed and memory do not depend on the weights' values.

Presets: ``tiny`` (the demo's models; for tests), ``quick`` (CPU, about 5 minutes on 2 cores:
FC-CLIP with ConvNeXt-L widths and stage 3 cut to 9 of 27 blocks at 384x512, DINOv2 ViT-g/14-reg4
cut to 4 of 40 blocks at 518, 10^5 database entries of 1536-d), ``full`` (a GPU: ConvNeXt-L at
800x1088, ViT-g/14 at 518, 10^6 entries).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from knnclip.engine.demo.synthetic import IMAGE_SIZE

WARMUP = 1  # untimed images per pipeline: sessions, text embeddings and caches are ready after one
STAGES = ("decode", "preprocess", "fcclip", "dinov2", "pool", "search", "fuse", "postprocess", "total")


@dataclass(frozen=True)
class Preset:
    name: str
    fcclip_depths: tuple[int, ...] | None  # None: the tiny demo model
    fcclip_size: tuple[int, int]
    dinov2: str  # "tiny" or a DINOv2 preset name
    dinov2_depth: int | None
    db_entries: int
    images: int
    image_size: tuple[int, int]  # of the synthetic input images


PRESETS = {
    "tiny": Preset("tiny", None, IMAGE_SIZE, "tiny", None, 1000, 3, IMAGE_SIZE),  # the demo's models
    "quick": Preset("quick", (3, 3, 9, 3), (384, 512), "vitg14_reg4", 4, 100_000, 3, (384, 512)),
    "full": Preset("full", (3, 3, 27, 3), (800, 1088), "vitg14_reg4", None, 1_000_000, 50, (768, 1024)),
}


# Building the benchmark's models and database ---------------------------------------------------
def build(
    preset: Preset, work: Path, say: Any = print, sampling: str = "gather", index: str = "flat"
) -> dict[str, Any]:
    """Export the preset's seeded models to ``work/models`` (torch weights kept for the reference;
    FC-CLIP's deformable attention sampling as ``sampling``) and fill ``work/db`` with
    ``db_entries`` embeddings in an ``index`` database (trained on the first 50,000 where it needs
    training); returns the models' FLOPs per image."""
    import torch

    from knnclip.engine.database import Database
    from knnclip.export.dinov2.onnx import export_dinov2_onnx
    from knnclip.export.fcclip.onnx import ImageGraph, export_fcclip_onnx

    fcclip, dinov2 = seeded_models(preset)
    models = work / "models"
    start = time.perf_counter()
    export_fcclip_onnx(
        fcclip, models / "fcclip", size=preset.fcclip_size, tokenizer="bytes", torch_weights=True, sampling=sampling
    )
    size = dinov2.config.img_size
    export_dinov2_onnx(dinov2, models / "dinov2", size=size, torch_weights=True)
    say(f"exported the models in {time.perf_counter() - start:.0f} s")
    flops = {
        "fcclip": count_flops(ImageGraph(fcclip), torch.zeros(1, 3, *preset.fcclip_size)),
        "dinov2": count_flops(dinov2.fix_input_size(size, size), torch.zeros(1, 3, size, size)),
    }
    start = time.perf_counter()
    dim = dinov2.config.embed_dim
    rng = np.random.default_rng(0)
    # 8 classes: text embeddings are computed once per class, off the per-image path, and the
    # full-width text tower makes each one cost ~0.2 TFLOP on a CPU; the search cost does not
    # depend on how many classes the entries carry (benchmarks/scaling.py times the
    # post-processing at 150 classes).
    names = [f"class {i}" for i in range(8)]
    with Database.create(work / "db", dim, index=index) as db:
        centres = rng.standard_normal((len(names), dim)).astype(np.float32)

        def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
            labels = rng.integers(0, len(names), n)
            return centres[labels] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32), labels

        if not db.is_trained:
            db.train(draw(min(50_000, preset.db_entries))[0])
        for first in range(0, preset.db_entries, 20_000):
            x, labels = draw(min(20_000, preset.db_entries - first))
            db.add(x, [names[i] for i in labels])
        db.checkpoint()
    say(f"database: {preset.db_entries} entries of {dim}-d in {time.perf_counter() - start:.0f} s")
    return flops


def seeded_models(preset: Preset) -> tuple[Any, Any]:
    from knnclip.engine.demo.models import seeded_dinov2, seeded_fcclip
    from knnclip.export.dinov2 import PRESETS as DINO_PRESETS
    from knnclip.export.dinov2 import DinoV2
    from knnclip.export.fcclip import FCCLIP, FCCLIPConfig
    from knnclip.export.random_init import seeded_init_

    if preset.fcclip_depths is None:
        fcclip = seeded_fcclip()
    else:
        cfg = FCCLIPConfig()
        cfg = dataclasses.replace(
            cfg,
            clip=dataclasses.replace(cfg.clip, depths=preset.fcclip_depths),
            inference=dataclasses.replace(
                cfg.inference, min_size_test=preset.fcclip_size[0], max_size_test=max(preset.fcclip_size)
            ),
        )
        fcclip = seeded_init_(FCCLIP(cfg), seed=1).eval()
    if preset.dinov2 == "tiny":
        dinov2 = seeded_dinov2()
    else:
        dino_cfg = DINO_PRESETS[preset.dinov2]
        if preset.dinov2_depth:
            dino_cfg = dataclasses.replace(dino_cfg, depth=preset.dinov2_depth)
        dinov2 = seeded_init_(DinoV2(dino_cfg), seed=2).eval()
    return fcclip.requires_grad_(False), dinov2.requires_grad_(False)


def count_flops(module: Any, x: Any) -> float:
    """Floating-point operations of one forward (torch's counter: 2 per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(x)
    return float(counter.get_total_flops())


def images(preset: Preset) -> list[np.ndarray]:
    from knnclip.engine.demo.synthetic import make_split

    return [s.image for s in make_split(preset.images + WARMUP, seed=7, size=preset.image_size)]
