"""How long metric accumulation takes at ADE20K's size, so that evaluation is bound by the models,
never by scoring: ``python benchmarks/metrics.py [--images 2000]``.

Per image: a 512x683 label map (ADE20K validation images are about this size after the usual
short-side-512 resize; full-size ones average about 0.28 Mpx too), 150 or 847 classes, a
prediction that agrees on 70% of the pixels; for PQ, 40 ground-truth and 40 predicted segments.
Writes ``results/metrics.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import machine, write_json, write_text

from knnclip.engine.eval.metrics import ConfusionMatrix, PanopticQuality


def label_maps(rng: np.random.Generator, classes: int, shape=(512, 683)) -> tuple[np.ndarray, np.ndarray]:
    blocks = rng.integers(0, classes, (shape[0] // 16 + 1, shape[1] // 16 + 1))
    gt = np.kron(blocks, np.ones((16, 16), np.int64))[: shape[0], : shape[1]]
    pred = np.where(rng.random(shape) < 0.7, gt, rng.integers(0, classes, shape))
    gt[rng.random(shape) < 0.05] = 255 if classes < 255 else 65535
    return pred, gt


def segment_maps(rng: np.random.Generator, shape=(512, 683), n: int = 40):
    cuts = np.sort(rng.choice(shape[0] * shape[1], n - 1, replace=False))
    gt = np.searchsorted(cuts, np.arange(shape[0] * shape[1])).reshape(shape) + 1
    pred = np.where(rng.random(shape) < 0.9, gt, 0) + 100
    gt_segments = {i: (int(rng.integers(150)), bool(rng.random() < 0.05)) for i in range(1, n + 1)}
    pred_segments = {i + 100: gt_segments[i][0] for i in range(1, n + 1)} | {100: 0}
    return pred, pred_segments, gt, gt_segments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for classes in (150, 847):
        cm = ConfusionMatrix(classes, 255 if classes < 255 else 65535)
        pairs = [label_maps(rng, classes) for _ in range(20)]
        start = time.perf_counter()
        for i in range(args.images):
            cm.update(*pairs[i % len(pairs)])
        seconds = time.perf_counter() - start
        rows.append(
            {
                "metric": f"mIoU, {classes} classes",
                "images": args.images,
                "seconds": round(seconds, 2),
                "ms_per_image": round(1e3 * seconds / args.images, 3),
            }
        )
    pq = PanopticQuality(150, [i % 2 == 0 for i in range(150)])
    cases = [segment_maps(rng) for _ in range(20)]
    start = time.perf_counter()
    for i in range(args.images):
        pq.update(*cases[i % len(cases)])
    seconds = time.perf_counter() - start
    rows.append(
        {
            "metric": "PQ, 150 classes, 40 segments",
            "images": args.images,
            "seconds": round(seconds, 2),
            "ms_per_image": round(1e3 * seconds / args.images, 3),
        }
    )
    payload = {"machine": machine(), "image_size": [512, 683], "rows": rows}
    write_json("metrics", payload)
    lines = [
        f"# Metric accumulation ({payload['machine']['cpu']}, {payload['machine']['cores']} cores)",
        "",
        "| metric | images | seconds | ms / image |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['metric']} | {r['images']} | {r['seconds']} | {r['ms_per_image']} |" for r in rows]
    write_text("metrics.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
