"""DINOv2 keys model: latency and peak memory of torch eager vs ONNX Runtime.

Each measurement runs in its own process, so its peak memory (the resident set high-water mark,
and on a GPU the CUDA allocator's peak) is its own: the ONNX Runtime process never imports torch.
Weights are random (speed and memory do not depend on their values), in the official shapes.

    python benchmarks/dinov2.py --quick   # CPU: ViT-S/14 and ViT-g/14-reg4 cut to 4 blocks, batch 1, 518x518
    python benchmarks/dinov2.py           # and, where CUDA is present, the full 40-block ViT-g in fp32 and fp16

Results: benchmarks/results/dinov2{.json,.md,.png} (or --name).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from common import machine, pyplot, rss_mib, spawn, time_calls, time_torch, write_json, write_text

SIZE = 518


def _config(preset: str, depth: int | None) -> Any:
    import dataclasses

    from knnclip.export.dinov2 import PRESETS

    cfg = PRESETS[preset]
    return dataclasses.replace(cfg, depth=depth) if depth else cfg


def _model(case: dict[str, Any]) -> Any:
    import torch

    from knnclip.export.dinov2 import DinoV2

    torch.manual_seed(0)
    return DinoV2(_config(case["preset"], case["depth"])).eval().requires_grad_(False)


def worker(case: dict[str, Any]) -> dict[str, Any]:
    """One measurement (or the export step), in this process."""
    import numpy as np

    backend = case["backend"]
    images = np.random.default_rng(0).standard_normal((case["batch"], 3, SIZE, SIZE), np.float32)
    if backend == "export":
        from knnclip.export.dinov2.onnx import export_dinov2_onnx

        result = export_dinov2_onnx(_model(case), case["onnx"], size=SIZE, fp16=case["fp16"])
        return {"rel_l2_error": result.rel_l2_error}
    if backend.startswith("ort"):
        import onnxruntime as ort

        providers = ["CUDAExecutionProvider"] if backend == "ort-cuda" else ["CPUExecutionProvider"]
        baseline = rss_mib()
        session = ort.InferenceSession(str(Path(case["onnx"]) / "model.onnx"), providers=providers)
        if session.get_providers()[0] != providers[0]:
            return {"error": f"{providers[0]} unavailable (onnxruntime-gpu not installed?)"}
        stats = time_calls(lambda: session.run(["keys"], {"images": images}), case["warmup"], case["repeats"])
        return {**stats, "baseline_rss_mib": baseline, "peak_rss_mib": rss_mib(), "threads": "onnxruntime default"}
    import torch

    device = "cuda" if backend == "torch-cuda" else "cpu"
    baseline = rss_mib()
    model = _model(case).to(device)
    if case["fp16"]:
        model.half_compute_()
    x = torch.from_numpy(images).to(device)
    return time_torch(model, x, device, case["warmup"], case["repeats"], baseline)


def cases(quick: bool, cuda: bool) -> list[dict[str, Any]]:
    models = [("vits14", None, "ViT-S/14"), ("vitg14_reg4", 4, "ViT-g/14-reg4, 4 of 40 blocks")]
    plans = []
    for preset, depth, label in models:
        reps = 10 if preset == "vits14" else 5
        plans += [
            dict(preset=preset, depth=depth, label=label, backend="torch-cpu", fp16=False, repeats=reps),
            dict(preset=preset, depth=depth, label=label, backend="ort-cpu", fp16=False, repeats=reps),
        ]
    if cuda and not quick:
        for preset, depth, label in [*models, ("vitg14_reg4", None, "ViT-g/14-reg4")]:
            for fp16 in (False, True):
                for backend in ("torch-cuda", "ort-cuda"):
                    plans.append(dict(preset=preset, depth=depth, label=label, backend=backend, fp16=fp16, repeats=30))
    for plan in plans:
        plan.setdefault("batch", 1)
        plan.setdefault("warmup", 2)
    return plans


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# DINOv2 keys model: torch eager vs ONNX Runtime",
        "",
        f"`{result['command']}` on {m['cpu']} ({m['cores']} cores, {m['memory_gib']} GiB), "
        f"torch {m['versions']['torch']}, onnxruntime {m['versions']['onnxruntime']}. "
        f"Batch {result['batch']}, {SIZE}x{SIZE} input, random weights in the official shapes; each row is "
        "a separate process. Peak memory: resident-set high-water mark of the process minus its value "
        "before the model was built or the session created (so the Python, torch or ONNX Runtime libraries "
        "are not counted).",
        "",
        "| model | backend | precision | median latency | p25..p75 | peak memory over baseline | CUDA peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        r = row["result"]
        head = f"| {row['label']} | {row['backend']} | {'fp16' if row['fp16'] else 'fp32'} |"
        if "error" in r:
            lines.append(f"{head} error: {r['error']} | | | |")
            continue
        cuda = f"{r['cuda_peak_mib']:.0f} MiB" if "cuda_peak_mib" in r else ""
        spread = f"{r['p25_s'] * 1e3:.0f}..{r['p75_s'] * 1e3:.0f} ms"
        peak = f"{r['peak_rss_mib'] - r['baseline_rss_mib']:.0f} MiB"
        lines.append(f"{head} {r['median_s'] * 1e3:.0f} ms | {spread} | {peak} | {cuda} |")
    exports = [f"{k}: {v['rel_l2_error']:.1e}" for k, v in result["exports"].items() if "rel_l2_error" in v]
    lines += ["", "ONNX export check (relative L2 error, ONNX Runtime vs torch fp32): " + ", ".join(exports), ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    rows = [r for r in result["rows"] if "error" not in r["result"]]
    labels = [f"{r['label']}\n{r['backend']} {'fp16' if r['fp16'] else 'fp32'}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.6 * len(rows) + 1.5))
    axes[0].barh(labels, [r["result"]["median_s"] * 1e3 for r in rows])
    axes[0].set_xlabel("median latency (ms), batch 1, 518x518")
    axes[1].barh(labels, [r["result"]["peak_rss_mib"] - r["result"]["baseline_rss_mib"] for r in rows])
    axes[1].set_xlabel("peak resident memory over baseline (MiB)")
    axes[1].set_yticks([])
    for ax in axes:
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU only: ViT-S and a 4-block ViT-g")
    parser.add_argument("--name", default="dinov2", help="results file stem under benchmarks/results/")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    import torch

    cuda = torch.cuda.is_available()
    plans = cases(args.quick, cuda)
    exports: dict[str, Any] = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for plan in plans:
            if plan["backend"].startswith("ort"):
                key = f"{plan['preset']}-{plan['depth']}-{'fp16' if plan['fp16'] else 'fp32'}"
                plan["onnx"] = str(Path(tmp) / key)
                if key not in exports:
                    exports[key] = spawn(__file__, {**plan, "backend": "export"})
                    print(f"export {key}: {exports[key]}", flush=True)
            result = spawn(__file__, plan)
            print(f"{plan['label']} {plan['backend']} fp16={plan['fp16']}: {result}", flush=True)
            rows.append({k: plan[k] for k in ("label", "preset", "depth", "backend", "fp16")} | {"result": result})
    result = {
        "command": "python benchmarks/dinov2.py" + (" --quick" if args.quick else ""),
        "machine": machine(),
        "batch": 1,
        "size": SIZE,
        "rows": rows,
        "exports": exports,
    }
    write_json(args.name, result)
    write_text(f"{args.name}.md", markdown(result))
    from common import RESULTS

    plot(result, RESULTS / f"{args.name}.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
