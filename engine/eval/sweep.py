"""Choosing k, tau, T and lambda from data (``knnclip eval sweep``).

The training split is divided: a held-out part (``held_out`` of the images, drawn with ``seed``)
is segmented, the rest builds the database. Each held-out image runs through the models once and
is searched once with the largest k; every grid point then only re-does retrieval scoring,
fusion and semantic inference (the smaller k's take the first k neighbours, which is what a
search with that k returns). Grid points that give the same fused probabilities for an image
share its semantic inference. Scored by mIoU over the dataset's classes.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from knnclip.engine.config import RetrievalConfig
from knnclip.engine.errors import InvalidInputError
from knnclip.engine.eval.datasets import Dataset
from knnclip.engine.eval.evaluate import Progress, add_dataset, class_lut, json_score
from knnclip.engine.eval.metrics import ConfusionMatrix
from knnclip.engine.pipeline import stages
from knnclip.engine.pipeline.timing import Timer

if TYPE_CHECKING:  # imported for its type only: the segmenter imports much of the engine
    from knnclip.engine.pipeline.segmenter import Segmenter


@dataclass(frozen=True)
class SweepGrid:
    k: tuple[int, ...] = (5, 10, 20)
    tau: tuple[float, ...] = (0.02, 0.05, 0.1)
    T: tuple[float, ...] = (0.3, 0.5, 0.7)
    lam: tuple[float, ...] = (0.3, 0.5, 0.7)
    fusion: tuple[str, ...] = ("out_of_vocab", "final")

    def configs(self, base: RetrievalConfig) -> list[RetrievalConfig]:
        if not all((self.k, self.tau, self.T, self.lam, self.fusion)):
            raise InvalidInputError("every sweep axis needs at least one value")
        axes = itertools.product(self.fusion, self.k, self.tau, self.T, self.lam)
        return [base.replace(fusion=f, k=k, tau=tau, T=T, lam=lam) for f, k, tau, T, lam in axes]


def split_held_out(n: int, held_out: float, seed: int) -> tuple[list[int], list[int]]:
    """(held-out indices, database indices), both sorted; at least one image in each."""
    if n < 2 or not 0 < held_out < 1:
        raise InvalidInputError(f"a sweep needs >= 2 training images and 0 < held_out < 1 (got {n}, {held_out})")
    order = np.random.default_rng(seed).permutation(n)
    cut = min(max(1, round(held_out * n)), n - 1)
    return sorted(order[:cut].tolist()), sorted(order[cut:].tolist())


def run_sweep(
    seg: Segmenter,
    train: Dataset,
    grid: SweepGrid = SweepGrid(),
    *,
    held_out: float = 0.2,
    seed: int = 0,
    progress: Callable[[str], Progress | None] = lambda _: None,
) -> dict[str, Any]:
    """Run the sweep with ``seg`` (whose database must start empty); returns the report with the
    best settings, their score and the data they came from."""
    if len(seg.db):
        raise InvalidInputError(f"{seg.db.path}: the sweep builds its own database; give it an empty one")
    start = time.perf_counter()
    configs = grid.configs(seg.config)
    held, rest = split_held_out(len(train), held_out, seed)
    added = add_dataset(seg, train.subset(rest), progress=progress("database"))
    lut = class_lut(seg, train.classes)
    n = len(train.classes)
    scores = [ConfusionMatrix(n, train.ignore) for _ in configs]
    base = ConfusionMatrix(n, train.ignore)  # FC-CLIP alone: lambda = 0
    k_max = max(c.k for c in configs)
    report_progress = progress("sweep")
    for done, i in enumerate(held, 1):
        (proposal,) = seg.propose([train.image(i)], Timer())
        sims, labels = seg.retrieve(proposal.queries, k_max)
        gt = train.semantic(i)
        semantic_of: dict[bytes, np.ndarray] = {}
        xp = proposal.xp
        for cfg, cm in [*zip(configs, scores, strict=True), (configs[0].replace(lam=0.0), base)]:
            fusion = stages.fuse(proposal, sims[:, : cfg.k], labels[:, : cfg.k], cfg)
            key = hashlib.blake2b(xp.to_host(fusion.mask_cls, "result").tobytes(), digest_size=16).digest()
            if key not in semantic_of:
                semantic_of[key] = lut[xp.to_host(stages.semantic_map(proposal, fusion.mask_cls), "result")]
            cm.update(semantic_of[key], gt)
        if report_progress is not None:
            report_progress(done, len(held))
    rows = [{"config": c.to_json(), "miou": json_score(cm.miou())} for c, cm in zip(configs, scores, strict=True)]
    best = max(rows, key=lambda r: -1.0 if r["miou"] is None else float(cast(float, r["miou"])))  # first of equals
    return {
        "protocol": "sweep",
        "dataset": {
            "key": train.key,
            "split": train.split,
            "held_out_images": len(held),
            "database_images": len(rest),
            "classes": n,
        },
        "grid": rows,
        "best": best,
        "base_miou": json_score(base.miou()),
        "source": {
            "dataset": train.key,
            "split": train.split,
            "held_out": held_out,
            "seed": seed,
            "held_out_images": len(held),
            "database_entries": added["entries"],
            "miou": best["miou"],
            "base_miou": json_score(base.miou()),
            "models": seg.models.identity(),
        },
        "seconds": round(time.perf_counter() - start, 3),
    }
