"""FC-CLIP image part: latency and peak memory of torch eager vs ONNX Runtime.

Each measurement runs in its own process (its memory peak is its own; the ONNX Runtime process
never imports torch). Weights are seeded random values in the real shapes: speed and memory do
not depend on them. The image part is what the engine runs per image: ConvNeXt CLIP trunk, pixel
decoder, masked-attention decoder, mask-pooled CLIP embeddings.

    python benchmarks/fcclip.py --quick   # CPU: ConvNeXt-L widths with stage 3 cut to 9 of 27 blocks, 512x672
    python benchmarks/fcclip.py           # and, where CUDA is present, the full model at 800x1088

Results: benchmarks/results/fcclip{.json,.md} (or --name).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from common import machine, rss_mib, spawn, time_calls, time_torch, write_json, write_text


def _model(case: dict[str, Any]) -> Any:
    import dataclasses

    from knnclip.export.fcclip import FCCLIP, FCCLIPConfig
    from knnclip.export.random_init import seeded_init_

    cfg = FCCLIPConfig()
    if case["depths"]:
        cfg = dataclasses.replace(cfg, clip=dataclasses.replace(cfg.clip, depths=tuple(case["depths"])))
    return seeded_init_(FCCLIP(cfg), seed=0).eval().requires_grad_(False)


def worker(case: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    height, width = case["size"]
    images = np.random.default_rng(0).standard_normal((1, 3, height, width), np.float32)
    if case["backend"] == "export":
        from knnclip.export.fcclip.onnx import export_fcclip_onnx

        result = export_fcclip_onnx(_model(case), case["onnx"], size=(height, width))
        return {"rel_l2_error": result.image.rel_l2_error}
    if case["backend"].startswith("ort"):
        import onnxruntime as ort

        providers = ["CUDAExecutionProvider"] if case["backend"] == "ort-cuda" else ["CPUExecutionProvider"]
        baseline = rss_mib()
        session = ort.InferenceSession(str(Path(case["onnx"]) / "image" / "model.onnx"), providers=providers)
        if session.get_providers()[0] != providers[0]:
            return {"error": f"{providers[0]} unavailable (onnxruntime-gpu not installed?)"}
        stats = time_calls(lambda: session.run(None, {"images": images}), case["warmup"], case["repeats"])
        return {**stats, "baseline_rss_mib": baseline, "peak_rss_mib": rss_mib()}
    import torch

    from knnclip.export.fcclip.onnx import ImageGraph

    device = "cuda" if case["backend"] == "torch-cuda" else "cpu"
    baseline = rss_mib()
    model = ImageGraph(_model(case)).to(device)
    x = torch.from_numpy(images).to(device)
    return time_torch(model, x, device, case["warmup"], case["repeats"], baseline)


def cases(quick: bool, cuda: bool) -> list[dict[str, Any]]:
    reduced = dict(label="ConvNeXt-L widths, depths 3-3-9-3, 250 queries", depths=[3, 3, 9, 3], size=[512, 672])
    plans = [dict(reduced, backend=b, repeats=5) for b in ("torch-cpu", "ort-cpu")]
    if cuda and not quick:
        full = dict(label="FC-CLIP ConvNeXt-L (full)", depths=None, size=[800, 1088])
        plans += [dict(full, backend=b, repeats=20) for b in ("torch-cuda", "ort-cuda")]
    for plan in plans:
        plan["warmup"] = 1
    return plans


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# FC-CLIP image part: torch eager vs ONNX Runtime",
        "",
        f"`{result['command']}` on {m['cpu']} ({m['cores']} cores, {m['memory_gib']} GiB), "
        f"torch {m['versions']['torch']}, onnxruntime {m['versions']['onnxruntime']}. Batch 1, seeded random "
        "weights in the real shapes; each row is a separate process. Peak memory: resident-set high-water "
        "mark minus its value before the model or session was made.",
        "",
        "| model | input | backend | median latency | p25..p75 | peak memory over baseline |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        r = row["result"]
        head = f"| {row['label']} | {row['size'][0]}x{row['size'][1]} | {row['backend']} |"
        if "error" in r:
            lines.append(f"{head} error: {r['error']} | | |")
            continue
        spread = f"{r['p25_s'] * 1e3:.0f}..{r['p75_s'] * 1e3:.0f} ms"
        peak = f"{r['peak_rss_mib'] - r['baseline_rss_mib']:.0f} MiB"
        lines.append(f"{head} {r['median_s'] * 1e3:.0f} ms | {spread} | {peak} |")
    exports = [f"{k}: {v.get('rel_l2_error', v.get('error'))}" for k, v in result["exports"].items()]
    lines += ["", "ONNX export check (largest relative L2 error over outputs, vs torch): " + ", ".join(exports), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU only, the reduced model")
    parser.add_argument("--name", default="fcclip", help="results file stem under benchmarks/results/")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    import torch

    plans = cases(args.quick, torch.cuda.is_available())
    exports: dict[str, Any] = {}
    directories: dict[str, str] = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for plan in plans:
            key = f"{plan['label']} {plan['size'][0]}x{plan['size'][1]}"
            if plan["backend"].startswith("ort"):
                plan["onnx"] = directories.setdefault(key, str(Path(tmp) / f"model{len(directories)}"))
                if key not in exports:
                    exports[key] = spawn(__file__, {**plan, "backend": "export"})
                    print(f"export {key}: {exports[key]}", flush=True)
            result = spawn(__file__, plan)
            print(f"{key} {plan['backend']}: {result}", flush=True)
            rows.append({k: plan[k] for k in ("label", "size", "backend")} | {"result": result})
    result = {
        "command": "python benchmarks/fcclip.py" + (" --quick" if args.quick else ""),
        "machine": machine(),
        "rows": rows,
        "exports": exports,
    }
    write_json(args.name, result)
    write_text(f"{args.name}.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
