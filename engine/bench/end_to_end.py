"""``knnclip bench``: per-stage latency, throughput and memory of the engine, side by side with
a PyTorch eager reference pipeline on the same weights, images and database.

The reference runs the models as the research code does: torch modules in eager mode, FC-CLIP's
own forward (auxiliary predictions included), mask pooling with ``F.interpolate`` and einsum, an
exact fp32 ``faiss.IndexFlatIP``, retrieval probabilities and fusion in a Python loop, FC-CLIP's
torch semantic and panoptic inference. The engine runs the exported graphs through a backend
(ONNX Runtime here), the compiled ops and the database. Each pipeline runs in its own process,
so its peak memory is its own.

Presets: ``tiny`` (the demo's models; for tests), ``quick`` (CPU, about 5 minutes on 2 cores:
FC-CLIP with ConvNeXt-L widths and stage 3 cut to 9 of 27 blocks at 384x512, DINOv2 ViT-g/14-reg4
cut to 4 of 40 blocks at 518, 10^5 database entries of 1536-d), ``full`` (a GPU: ConvNeXt-L at
800x1088, ViT-g/14 at 518, 10^6 entries). Weights are seeded random values in the real shapes:
speed and memory do not depend on them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from knnclip.engine.info import machine_slug, peak_rss_mib

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
    "tiny": Preset("tiny", None, (192, 256), "tiny", None, 1000, 3, (192, 256)),
    "quick": Preset("quick", (3, 3, 9, 3), (384, 512), "vitg14_reg4", 4, 100_000, 3, (384, 512)),
    "full": Preset("full", (3, 3, 27, 3), (800, 1088), "vitg14_reg4", None, 1_000_000, 50, (768, 1024)),
}


# Building the benchmark's models and database ---------------------------------------------------
def build(preset: Preset, work: Path, say: Any = print) -> dict[str, Any]:
    """Export the preset's seeded models to ``work/models`` (torch weights kept for the reference)
    and fill ``work/db`` with ``db_entries`` embeddings; returns the models' FLOPs per image."""
    import torch

    from knnclip.engine.database import Database
    from knnclip.export.fcclip.onnx import ImageGraph, export_fcclip_onnx
    from knnclip.export.onnx import export_dinov2_onnx

    fcclip, dinov2 = _models(preset)
    models = work / "models"
    start = time.perf_counter()
    export_fcclip_onnx(fcclip, models / "fcclip", size=preset.fcclip_size, tokenizer="bytes", torch_weights=True)
    size = dinov2.config.img_size
    export_dinov2_onnx(dinov2, models / "dinov2", size=size, torch_weights=True)
    say(f"exported the models in {time.perf_counter() - start:.0f} s")
    flops = {
        "fcclip": _flops(ImageGraph(fcclip), torch.zeros(1, 3, *preset.fcclip_size)),
        "dinov2": _flops(dinov2.fix_input_size(size, size), torch.zeros(1, 3, size, size)),
    }
    start = time.perf_counter()
    dim = dinov2.config.embed_dim
    rng = np.random.default_rng(0)
    # 8 classes: text embeddings are computed once per class, off the per-image path, and the
    # full-width text tower makes each one cost ~0.2 TFLOP on a CPU; the search cost does not
    # depend on how many classes the entries carry (benchmarks/scaling.py times the
    # post-processing at 150 classes).
    names = [f"class {i}" for i in range(8)]
    with Database.create(work / "db", dim) as db:
        centres = rng.standard_normal((len(names), dim)).astype(np.float32)
        for first in range(0, preset.db_entries, 20_000):
            n = min(20_000, preset.db_entries - first)
            labels = rng.integers(0, len(names), n)
            x = centres[labels] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
            db.add(x, [names[i] for i in labels])
        db.checkpoint()
    say(f"database: {preset.db_entries} entries of {dim}-d in {time.perf_counter() - start:.0f} s")
    return flops


def _models(preset: Preset) -> tuple[Any, Any]:
    from knnclip.engine.demo.run import _seeded_dinov2, _seeded_fcclip
    from knnclip.export.dinov2 import PRESETS as DINO_PRESETS
    from knnclip.export.dinov2 import DinoV2
    from knnclip.export.fcclip import FCCLIP, FCCLIPConfig
    from knnclip.export.random_init import seeded_init_

    if preset.fcclip_depths is None:
        fcclip = _seeded_fcclip()
    else:
        cfg = FCCLIPConfig()
        cfg = dataclasses.replace(
            cfg,
            clip=dataclasses.replace(cfg.clip, depths=preset.fcclip_depths),
            inference=dataclasses.replace(cfg.inference, min_size_test=preset.fcclip_size[0],
                                          max_size_test=max(preset.fcclip_size)),
        )  # fmt: skip
        fcclip = seeded_init_(FCCLIP(cfg), seed=1).eval()
    if preset.dinov2 == "tiny":
        dinov2 = _seeded_dinov2()
    else:
        cfg = DINO_PRESETS[preset.dinov2]
        if preset.dinov2_depth:
            cfg = dataclasses.replace(cfg, depth=preset.dinov2_depth)
        dinov2 = seeded_init_(DinoV2(cfg), seed=2).eval()
    return fcclip.requires_grad_(False), dinov2.requires_grad_(False)


def _flops(module: Any, x: Any) -> float:
    """Floating-point operations of one forward (torch's counter: 2 per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(x)
    return float(counter.get_total_flops())


def _images(preset: Preset) -> list[np.ndarray]:
    from knnclip.engine.demo.synthetic import make_split

    return [s.image for s in make_split(preset.images + WARMUP, seed=7, size=preset.image_size)]


# The two pipelines, each run in a worker process --------------------------------------------------
def run_engine(work: Path, preset: Preset, backend: str, device: str) -> dict[str, Any]:
    from knnclip.engine.pipeline.segmenter import Segmenter

    baseline = peak_rss_mib()
    images = _images(preset)
    seg = Segmenter.from_dir(work / "models", work / "db", backend=backend, device=device, read_only=True,
                             text_cache=work / "text-cache")  # fmt: skip
    for image in images[:WARMUP]:  # warm-up: sessions, text embeddings, caches
        seg.segment(image)
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    for image in images[WARMUP:]:
        r = seg.segment(image)
        for s in STAGES:
            stages[s].append(r.timings.get(s, 0.0) + (r.timings.get("classify", 0.0) if s == "fuse" else 0.0))
    # One request at a time: the timed pass above. Two concurrent requests: each thread takes half.
    throughput = {"1": 1e3 * len(stages["total"]) / sum(stages["total"])}
    timed = images[WARMUP:]
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


def run_reference(work: Path, preset: Preset, device: str) -> dict[str, Any]:
    """The research-code way, timed per stage: torch eager models, torch pooling, faiss flat fp32,
    a Python loop for retrieval probabilities and fusion, torch post-processing."""
    import faiss
    import torch
    import torch.nn.functional as F

    from knnclip.engine.artifact import read_manifest
    from knnclip.engine.config import RetrievalConfig
    from knnclip.engine.database import Database
    from knnclip.engine.pipeline.preprocess import load_image, shortest_edge_size
    from knnclip.engine.text.textbank import TextBank
    from knnclip.engine.text.tokenizer import ByteTokenizer
    from knnclip.export.fcclip import inference as fc
    from knnclip.export.modules import build_module

    baseline = peak_rss_mib()
    dev = torch.device(device)
    models = work / "models"
    image_manifest = read_manifest(models / "fcclip" / "image", verify_files=False)
    fcclip = build_module(models / "fcclip" / "image", image_manifest).model.to(dev)
    dinov2 = build_module(models / "dinov2", read_manifest(models / "dinov2", verify_files=False)).to(dev)
    cfg = fcclip.config.inference
    with Database.open(work / "db", read_only=True) as db:
        entry_ids, labels = db.entries()  # index order: position i of the faiss index below is entry i here
        vectors = np.ascontiguousarray(db.vectors(entry_ids), np.float32)
        vocab = sorted(db.vocabulary.values(), key=lambda c: c.id)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    from knnclip.engine.backends import open_session

    text_manifest = read_manifest(models / "fcclip" / "text", verify_files=False)
    text = TextBank(
        open_session(models / "fcclip" / "text", "onnxruntime", "cpu"), ByteTokenizer(), text_manifest["templates"],
        text_manifest["weights_sha256"], cache_dir=work / "text-cache",
    )  # fmt: skip
    rows = text.rows([c.name for c in vocab])
    classifier = fcclip.classifier_with_void(torch.from_numpy(rows).to(dev))
    id_to_index = {c.id: i for i, c in enumerate(vocab)}
    rc = RetrievalConfig()
    seen = torch.zeros(len(vocab), device=dev)
    mean = torch.tensor(cfg.pixel_mean, device=dev).view(3, 1, 1)
    std = torch.tensor(cfg.pixel_std, device=dev).view(3, 1, 1)
    fixed = tuple(image_manifest["input_size"])
    dino_size = dinov2.config.img_size

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def segment(image: np.ndarray) -> dict[str, float]:
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        pixels = load_image(image)
        t["decode"] = time.perf_counter()
        from PIL import Image

        h, w = pixels.shape[:2]
        size = shortest_edge_size(h, w, cfg.min_size_test, cfg.max_size_test)
        scale = min(1.0, fixed[0] / size[0], fixed[1] / size[1])
        size = (min(fixed[0], int(size[0] * scale + 0.5)), min(fixed[1], int(size[1] * scale + 0.5)))
        resized = np.asarray(Image.fromarray(pixels).resize((size[1], size[0]), Image.Resampling.BILINEAR))
        x = (torch.from_numpy(resized).to(dev).permute(2, 0, 1).float() - mean) / std
        x = F.pad(x, (0, fixed[1] - size[1], 0, fixed[0] - size[0]))[None]
        d = torch.from_numpy(pixels).to(dev).permute(2, 0, 1)[None].float() / 255
        d = F.interpolate(d, size=(dino_size, dino_size), mode="bicubic", align_corners=False)
        d = (d - torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1)  # fmt: skip
        sync()
        t["preprocess"] = time.perf_counter()
        with torch.inference_mode():
            out = fcclip.forward_image(x, classifier, [1] * len(vocab))
            sync()
            t["fcclip"] = time.perf_counter()
            keys = dinov2(d)
            sync()
            t["dinov2"] = time.perf_counter()
            masks = out["pred_masks"][0]
            valid = masks[:, : -(-size[0] // 4), : -(-size[1] // 4)]
            m = F.interpolate(valid[None], size=keys.shape[-2:], mode="bilinear", align_corners=False)[0] > 0
            m = m.float() / (m.float().sum((1, 2), keepdim=True) + 1e-8)
            q = torch.einsum("qhw,chw->qc", m, keys[0])
            q = F.normalize(q, dim=-1).cpu().numpy()
            t["pool"] = time.perf_counter()
            sims, ids = index.search(q, rc.k)
            t["search"] = time.perf_counter()
            mask_cls = fc.ensemble(out["pred_logits"][0], out["ov_logits"][0], seen, cfg.alpha, cfg.beta)
            probs = mask_cls.softmax(-1).cpu().numpy()
            fused = probs.copy()
            for qi in range(len(q)):  # retrieval probabilities and fusion, one query at a time
                p_ret = np.zeros(len(vocab))
                weights = np.exp((sims[qi] - sims[qi].max()) / rc.tau)
                weights /= weights.sum()
                for j, entry in enumerate(ids[qi]):
                    if entry >= 0:
                        p_ret[id_to_index[int(labels[entry])]] += weights[j]
                if p_ret.max() >= rc.T:
                    fused[qi, :-1] = rc.lam * p_ret * (1 - probs[qi, -1]) + (1 - rc.lam) * probs[qi, :-1]
            mask_cls = torch.log(torch.from_numpy(fused).to(dev) + 1e-8)
            t["fuse"] = time.perf_counter()
            full = fc.resize_masks(masks, fixed, size, (h, w))
            semantic = fc.semantic_inference(mask_cls, full).argmax(0)
            fc.panoptic_inference(mask_cls, full, [False] * len(vocab), cfg.object_mask_threshold,
                                  cfg.overlap_threshold)  # fmt: skip
            semantic.cpu()
            sync()
            t["postprocess"] = time.perf_counter()
        marks = [t0, *(t[s] for s in STAGES[:-1])]
        out_ms = {s: (marks[i + 1] - marks[i]) * 1e3 for i, s in enumerate(STAGES[:-1])}
        out_ms["total"] = (t["postprocess"] - t0) * 1e3
        return out_ms

    images = _images(preset)
    for image in images[:WARMUP]:
        segment(image)
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    for image in images[WARMUP:]:
        for s, v in segment(image).items():
            stages[s].append(v)
    throughput = {"1": 1e3 * len(stages["total"]) / sum(stages["total"])}
    return {"stages_ms": stages, "throughput_images_per_s": throughput, "peak_rss_mib": peak_rss_mib() - baseline,
            "backends": {"all": f"torch {torch.__version__} eager on {device}, faiss IndexFlatIP fp32"}}  # fmt: skip


# Orchestration ----------------------------------------------------------------------------------
def _worker(args: dict[str, Any]) -> dict[str, Any]:
    preset, work = PRESETS[args["preset"]], Path(args["work"])
    if args["pipeline"] == "reference":
        return run_reference(work, preset, args["device"])
    return run_engine(work, preset, args["backend"], args["device"])


def _spawn(args: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    command = [sys.executable, "-m", "knnclip.engine.bench.end_to_end", json.dumps(args)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:] or [f"exit {proc.returncode}"]
        return {"error": " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "min": float(a.min()), "max": float(a.max()), "n": len(values)}  # fmt: skip


def run_bench(preset_name: str, work: Path, out_dir: Path, name: str | None = None, say: Any = print) -> dict[str, Any]:
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
        results[label] = _spawn({**args, "preset": preset_name, "work": str(work)})
        if "error" in results[label]:
            say(f"  {label}: {results[label]['error']}")
    from knnclip.engine.database import Database

    with Database.open(work / "db", read_only=True) as db:
        stats = db.stats()
    report = {
        "command": f"knnclip bench --preset {preset_name}",
        "preset": dataclasses.asdict(preset),
        "machine": _machine(),
        "device": device,
        "flops_per_image": flops,
        "database": {"entries": stats["entries"], "dim": stats["dim"], "storage": stats["storage"],
                     "bytes_read_per_search": stats["entries"] * stats["code_bytes_per_entry"]},  # fmt: skip
        "pipelines": {
            label: r if "error" in r else {
                **r, "stages": {s: percentiles(v) for s, v in r["stages_ms"].items() if v},
            }
            for label, r in results.items()
        },  # fmt: skip
    }
    name = name or f"end_to_end-{preset_name}-{machine_slug()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / f"{name}.md").write_text(markdown(report))
    _plot(report, out_dir / f"{name}.png")
    say(markdown(report))
    return report


def _machine() -> dict[str, Any]:
    from knnclip import _C

    versions = {}
    for module in ("numpy", "onnxruntime", "faiss", "torch"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = None
    return {"name": machine_slug(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions, "knnclip_build": _C.build_info()}  # fmt: skip


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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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
