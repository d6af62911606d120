"""``knnclip bench``: per-stage latency, throughput and memory of the engine, side by side with
the PyTorch eager reference pipeline (:mod:`.reference`) on the same weights, images and
database (:mod:`.build`). Each pipeline runs in its own process, so its peak memory is its own.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from knnclip.engine.bench import harness
from knnclip.engine.bench.build import PRESETS, STAGES, WARMUP, Preset, build, images
from knnclip.engine.bench.harness import peak_rss_mib, percentiles
from knnclip.engine.config import RetrievalConfig

WORKER_MODULE = "knnclip.engine.bench.end_to_end"


# The two pipelines, each run in a worker process --------------------------------------------------
def run_engine(work: Path, preset: Preset, backend: str, device: str, fusion: str) -> dict[str, Any]:
    from knnclip.engine.pipeline.segmenter import Segmenter

    baseline = peak_rss_mib()
    images_ = images(preset)
    seg = Segmenter.from_dir(work / "models", work / "db", backend=backend, device=device, read_only=True,
                             config=RetrievalConfig(fusion=fusion),
                             text_cache=work / "text-cache")  # fmt: skip
    for image in images_[:WARMUP]:  # warm-up: sessions, text embeddings, caches
        seg.segment(image)
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    for image in images_[WARMUP:]:
        r = seg.segment(image)
        for s in STAGES:
            stages[s].append(r.timings.get(s, 0.0) + (r.timings.get("classify", 0.0) if s == "fuse" else 0.0))
    # One request at a time: the timed pass above. Two concurrent requests: each thread takes half.
    throughput = {"1": 1e3 * len(stages["total"]) / sum(stages["total"])}
    timed = images_[WARMUP:]
    start = time.perf_counter()
    threads = [threading.Thread(target=lambda part=part: [seg.segment(i) for i in part])
               for part in (timed[0::2], timed[1::2])]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    throughput["2"] = len(timed) / (time.perf_counter() - start)
    backends = seg.models.backends
    seg.close()
    return {"stages_ms": stages, "throughput_images_per_s": throughput, "peak_rss_mib": peak_rss_mib() - baseline,
            "backends": backends}  # fmt: skip


def run_reference(work: Path, preset: Preset, device: str, fusion: str) -> dict[str, Any]:
    """The research-code pipeline (:class:`ReferencePipeline`) over the preset's images."""
    import torch

    from knnclip.engine.bench.reference import ReferencePipeline

    baseline = peak_rss_mib()
    pipeline = ReferencePipeline(work, device, RetrievalConfig(fusion=fusion))
    images_ = images(preset)
    for image in images_[:WARMUP]:
        pipeline.segment(image)
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    for image in images_[WARMUP:]:
        for s, v in pipeline.segment(image).items():
            stages[s].append(v)
    throughput = {"1": 1e3 * len(stages["total"]) / sum(stages["total"])}
    return {
        "stages_ms": stages,
        "throughput_images_per_s": throughput,
        "peak_rss_mib": peak_rss_mib() - baseline,
        "backends": {"all": f"torch {torch.__version__} eager on {device}, faiss IndexFlatIP fp32"},
    }


# Orchestration ----------------------------------------------------------------------------------
def _worker(args: dict[str, Any]) -> dict[str, Any]:
    preset, work = PRESETS[args["preset"]], Path(args["work"])
    if args["pipeline"] == "reference":
        return run_reference(work, preset, args["device"], args["fusion"])
    return run_engine(work, preset, args["backend"], args["device"], args["fusion"])


def run_bench(
    preset_name: str,
    work: Path,
    out_dir: Path,
    name: str | None = None,
    say: Any = print,
    fusion: str = "out_of_vocab",
) -> dict[str, Any]:
    """Build, run every pipeline available here in its own process, write JSON, Markdown and a plot."""
    preset = PRESETS[preset_name]
    work.mkdir(parents=True, exist_ok=True)
    flops = build(preset, work, say)
    from knnclip.engine.backends import cuda_usable

    device = "cuda" if cuda_usable() else "cpu"
    pipelines = [("engine onnxruntime", {"pipeline": "engine", "backend": "onnxruntime", "device": device})]
    if device == "cuda":
        pipelines.append(("engine tensorrt", {"pipeline": "engine", "backend": "tensorrt", "device": "cuda"}))
    pipelines.append(("torch reference", {"pipeline": "reference", "device": device}))
    results = {}
    for label, args in pipelines:
        say(f"running {label} ...")
        results[label] = harness.spawn_module(
            WORKER_MODULE, {**args, "preset": preset_name, "work": str(work), "fusion": fusion}
        )
        if "error" in results[label]:
            say(f"  {label}: {results[label]['error']}")
    from knnclip.engine.database import Database

    with Database.open(work / "db", read_only=True) as db:
        stats = db.stats()
    report = {
        "command": f"knnclip bench --preset {preset_name}"
        + ("" if fusion == "out_of_vocab" else f" --fusion {fusion}"),
        "fusion": fusion,
        "preset": dataclasses.asdict(preset),
        "machine": harness.machine(),
        "device": device,
        "flops_per_image": flops,
        "database": {
            "entries": stats["entries"],
            "dim": stats["dim"],
            "storage": stats["storage"],
            "bytes_read_per_search": stats["entries"] * stats["code_bytes_per_entry"],
        },  # fmt: skip
        "pipelines": {
            label: r
            if "error" in r
            else {
                **r,
                "stages": {s: percentiles(v) for s, v in r["stages_ms"].items() if v},
            }
            for label, r in results.items()
        },  # fmt: skip
    }
    name = name or f"end_to_end-{preset_name}-{harness.machine_slug()}"
    harness.write_json(name, report, out_dir)
    harness.write_text(f"{name}.md", markdown(report), out_dir)
    _plot(report, out_dir / f"{name}.png")
    say(markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    pipes = {k: v for k, v in report["pipelines"].items() if "error" not in v}
    ref = pipes.get("torch reference")
    lines = [
        f"# End to end: `{report['command']}` on {report['machine']['name']} ({report['device']})",
        "",
        "Per-stage latency per image, p50 (p90) in ms over the timed images after a warm-up image;"
        " ratio = reference p50 / engine p50 (above 1: the engine is faster). 'fuse' includes classification.",
        "",
        "| stage | " + " | ".join(pipes) + (" | ratio (reference / engine onnxruntime) |" if ref else " |"),
        "|---|" + "---|" * len(pipes) + ("---|" if ref else ""),
    ]
    engine = pipes.get("engine onnxruntime")
    for stage in STAGES:
        cells = []
        for p in pipes.values():
            s = p["stages"].get(stage)
            cells.append(f"{s['p50']:.1f} ({s['p90']:.1f})" if s else "-")
        ratio = ""
        if ref and engine and stage in ref["stages"] and stage in engine["stages"]:
            e = engine["stages"][stage]["p50"]
            ratio = f" {ref['stages'][stage]['p50'] / e:.2f}x |" if e > 0 else " - |"
        lines.append(f"| {stage} | " + " | ".join(cells) + (" |" + ratio if ref else " |"))
    lines += ["", "| pipeline | throughput (images/s) by concurrent requests | peak RSS over baseline |"]
    lines.append("|---|---|---|")
    for label, p in pipes.items():
        t = ", ".join(f"{k}: {v:.2f}" for k, v in p["throughput_images_per_s"].items())
        lines.append(f"| {label} | {t} | {p['peak_rss_mib']:.0f} MiB |")
    for label, p in report["pipelines"].items():
        if "error" in p:
            lines.append(f"| {label} | error: {p['error']} | |")
    f, db = report["flops_per_image"], report["database"]
    lines += [
        "",
        f"Work per image: FC-CLIP image part {f['fcclip'] / 1e9:.1f} GFLOP, DINOv2 {f['dinov2'] / 1e9:.1f} GFLOP"
        + "".join(
            f"; {label}: {f['fcclip'] / 1e6 / p['stages']['fcclip']['p50']:.0f} and "
            f"{f['dinov2'] / 1e6 / p['stages']['dinov2']['p50']:.0f} GFLOP/s achieved"
            for label, p in pipes.items()
        ),
        f"Search: {db['entries']} entries x {db['dim']}-d {db['storage']}, "
        f"{db['bytes_read_per_search'] / 2**20:.0f} MiB read per search (all queries of an image at once).",
        "",
    ]
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    if plt is None:
        return
    pipes = {k: v for k, v in report["pipelines"].items() if "error" not in v}
    stages = [s for s in STAGES if s != "total"]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.5 * len(pipes)))
    left = np.zeros(len(pipes))
    for stage in stages:
        values = np.array([p["stages"].get(stage, {"p50": 0.0})["p50"] for p in pipes.values()])
        ax.barh(list(pipes), values, left=left, label=stage)
        left += values
    ax.set_xlabel("p50 latency per image (ms), by stage")
    ax.legend(ncol=4, fontsize=7, loc="lower right")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
