"""Does the FC-CLIP exporter's check accept correct graphs at FC-CLIP's real decoder sizes?
``python benchmarks/export_check.py [--seeds 1 2 3]``: seeded checkpoints with ConvNeXt-L widths
(stage 3 cut to 9 of 27 blocks, as ``knnclip bench --quick``), 250 queries, exported at 512x704,
and once more with torch weights; records each export's verification (per-output errors, the mask
flips at logit 0 it allowed) and whether it was refused. Writes ``results/export-check.json`` and
``.md``."""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

from common import machine, write_json, write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()

    from knnclip.engine.errors import KnnclipError
    from knnclip.export.fcclip import FCCLIP, FCCLIPConfig
    from knnclip.export.fcclip.onnx import export_fcclip_onnx
    from knnclip.export.random_init import seeded_init_

    cfg = FCCLIPConfig()
    cfg = dataclasses.replace(cfg, clip=dataclasses.replace(cfg.clip, depths=(3, 3, 9, 3)))
    rows = []
    with tempfile.TemporaryDirectory(prefix="knnclip-export-check-") as work:
        runs = [(seed, False) for seed in args.seeds] + [(args.seeds[0], True)]
        for i, (seed, torch_weights) in enumerate(runs):
            model = seeded_init_(FCCLIP(cfg), seed=seed).eval()
            start = time.perf_counter()
            try:
                result = export_fcclip_onnx(
                    model, Path(work) / f"fc{i}", size=(512, 704), seen_names=[], torch_weights=torch_weights
                )
                v = result.image.manifest.body["verification"]
                row = {
                    "seed": seed,
                    "torch_weights": torch_weights,
                    "refused": None,
                    "errors": {k: float(f"{e:.3g}") for k, e in v["rel_l2_error_per_output"].items()},
                    "mask_flips": v["ov_embed_mask_flips"],
                    "ov_embed_vs_torch_masks": float(f"{v['ov_embed_rel_l2_vs_torch_masks']:.3g}"),
                }
            except KnnclipError as exc:
                row = {"seed": seed, "torch_weights": torch_weights, "refused": str(exc)}
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(row)
    payload = {
        "machine": machine(),
        "command": "python benchmarks/export_check.py",
        "size": [512, 704],
        "queries": cfg.decoder.num_queries,
        "depths": list(cfg.clip.depths),
        "rows": rows,
    }
    write_json("export-check", payload)
    lines = [
        "# FC-CLIP export check at real decoder sizes (`python benchmarks/export_check.py`)",
        "",
        f"ConvNeXt-L widths, stage depths {payload['depths']}, {payload['queries']} queries, 512x704, seeded weights. "
        "'ov_embed' is checked against torch's pooling of ONNX Runtime's own binary masks; 'flips' counts the "
        "mask pixels at the CLIP map's resolution that landed on the other side of 0 (allowed within noise); "
        "'vs torch masks' is the plain comparison the check used to apply.",
        "",
        "| seed | torch weights | refused | mask_logits | class_embed | ov_embed | flips | vs torch masks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e = r.get("errors", {})
        lines.append(
            f"| {r['seed']} | {r['torch_weights']} | {r['refused'] or 'no'} | {e.get('mask_logits', '-')} | "
            f"{e.get('class_embed', '-')} | {e.get('ov_embed', '-')} | "
            f"{r.get('mask_flips', '-')} | {r.get('ov_embed_vs_torch_masks', '-')} |"
        )
    write_text("export-check.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
