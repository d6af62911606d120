"""``knnclip bench``: per-stage latency, throughput and memory of the engine, side by side with
the PyTorch eager reference pipeline (:mod:`.reference`) on the same weights, images and
database (:mod:`.build`). Each pipeline runs in its own process, so its peak memory is its own.

On a GPU (``--device cuda``) the engine's pipelines keep their arrays on the device from the
models' outputs to the label maps (:mod:`knnclip.engine.pipeline.arrays`); the report adds the
bytes each moved between host and device per image, the device memory it held, throughput at
batch 1, 4 and 8, and the floor a GPU's peak arithmetic and memory bandwidth put under the
latency. ``--dry-run`` runs that device pipeline's code on the CPU, with torch tensors standing in
for the device (CI runs it).
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
from knnclip.engine.bench.device import median_bytes
from knnclip.engine.bench.harness import peak_rss_mib, percentiles
from knnclip.engine.config import RetrievalConfig

WORKER_MODULE = "knnclip.engine.bench.end_to_end"


BATCHES = (1, 4, 8)  # throughput is measured at these batch sizes on a GPU
# A GPU's peak (dense fp16 tensor-core arithmetic, memory bandwidth) for the report's floor: an
# H100 SXM's, from NVIDIA's data sheet.
FLOOR_GPU: dict[str, Any] = {"name": "H100 SXM", "fp16_flops": 989e12, "bytes_per_s": 3.35e12}


# The pipelines, each run in a worker process ------------------------------------------------------
def run_engine(
    work: Path,
    preset: Preset,
    backend: str,
    device: str,
    fusion: str,
    save: str | None = None,
    arrays: str | None = None,
    precision: str | None = None,
) -> dict[str, Any]:
    """The engine over the preset's images; ``save`` names a file for the semantic maps (the
    agreement of each precision with fp32 is computed from them); ``arrays="torch-cpu"`` keeps
    the pipeline's arrays in torch on the CPU (the dry run of the device pipeline);
    ``precision`` builds TensorRT's engines in it."""
    from knnclip.engine.pipeline.segmenter import Segmenter

    baseline = peak_rss_mib()
    device_baseline = _device_memory_used(device)
    images_ = images(preset)
    if precision is not None:
        _record_tensorrt_precision(work / "models", precision)
    xp = None
    if arrays == "torch-cpu":
        from knnclip.engine.pipeline.arrays import TorchArrays

        xp = TorchArrays("cpu")
    # The bf16 pipeline is bf16 throughout: models and the database search.
    search = "bf16" if backend.endswith("bf16") else "fp32"
    seg = Segmenter.from_dir(
        work / "models",
        work / "db",
        backend=backend,
        device=device,
        read_only=True,
        config=RetrievalConfig(fusion=fusion),
        text_cache=work / "text-cache",
        search=search,
        arrays=xp,
    )
    for image in images_[:WARMUP]:  # warm-up: sessions, text embeddings, caches
        seg.segment(image)
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    semantic = []
    moved = []
    for image in images_[WARMUP:]:
        before = seg.xp.transfers.snapshot()
        r = seg.segment(image)
        moved.append(seg.xp.transfers.since(before))
        semantic.append(r.semantic)
        for s in STAGES:
            stages[s].append(r.timings.get(s, 0.0) + (r.timings.get("classify", 0.0) if s == "fuse" else 0.0))
    # One request at a time: the timed pass above. Two concurrent requests: each thread takes half.
    throughput = {"1": 1e3 * len(stages["total"]) / sum(stages["total"])}
    timed = images_[WARMUP:]
    start = time.perf_counter()
    threads = [
        threading.Thread(target=lambda part=part: [seg.segment(i) for i in part]) for part in (timed[0::2], timed[1::2])
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    throughput["2"] = len(timed) / (time.perf_counter() - start)
    on_device = not seg.xp.on_host
    batches = _batch_throughput(seg, timed) if on_device else {}
    backends = seg.models.backends
    chosen = {part: getattr(seg.models, part).backend for part in ("fcclip", "text", "dinov2")}
    arrays_used = repr(seg.xp)
    seg.close()
    if save is not None:
        np.savez_compressed(save, *semantic)
    out = {
        "stages_ms": stages,
        "throughput_images_per_s": throughput,
        "peak_rss_mib": peak_rss_mib() - baseline,
        "backends": backends,
        "backend_per_model": chosen,
        "arrays": arrays_used,
        "bytes_moved_per_image": median_bytes(moved),
    }
    if batches:
        out["throughput_by_batch_images_per_s"] = batches
    used = _device_memory_used(device)
    if used is not None and device_baseline is not None:
        out["device_memory_mib"] = (used - device_baseline) / 2**20
    return out


def _batch_throughput(seg: Any, timed: list[np.ndarray]) -> dict[str, float]:
    """Images per second through ``segment_batch`` at each of :data:`BATCHES` (the timed images
    repeated to fill two batches of the largest size)."""
    pool = [timed[i % len(timed)] for i in range(2 * max(BATCHES))]
    out = {}
    for size in BATCHES:
        seg.segment_batch(pool[:size], batch_size=size)  # warm: the batch's shapes
        start = time.perf_counter()
        seg.segment_batch(pool, batch_size=size)
        out[str(size)] = len(pool) / (time.perf_counter() - start)
    return out


def _device_memory_used(device: str) -> int | None:
    """Bytes in use on the CUDA device (every allocator: TensorRT, ONNX Runtime, torch, the ops'
    pool), or None on the CPU. Pools keep what they held, so after a run this is its high water."""
    if not device.startswith("cuda"):
        return None
    try:
        import torch

        free, total = torch.cuda.mem_get_info()
    except (ImportError, RuntimeError):
        return None
    return int(total - free)


def _record_tensorrt_precision(models: Path, precision: str) -> None:
    """Have TensorRT build each artefact's engine in ``precision`` at batches up to 8, as
    ``knnclip build --precision`` would (on TensorRT 11 the graph's own precision rules)."""
    from knnclip.engine.artifact import read_manifest
    from knnclip.engine.backends.tensorrt.builder import BuildSettings, record_build
    from knnclip.engine.backends.tensorrt.cache import EngineCache

    root = EngineCache().root
    for part in ("fcclip/image", "fcclip/text", "dinov2"):
        manifest = read_manifest(models / part)
        record_build(root, manifest, BuildSettings(precision=precision, max_batch=max(BATCHES)))


def run_reference(work: Path, preset: Preset, device: str, fusion: str, best: bool = False) -> dict[str, Any]:
    """The research-code pipeline (:class:`ReferencePipeline`) over the preset's images, or with
    ``best`` the best torch one (:class:`BestTorchPipeline`)."""
    import torch

    from knnclip.engine.bench.reference import BestTorchPipeline, ReferencePipeline

    baseline = peak_rss_mib()
    pipeline = (BestTorchPipeline if best else ReferencePipeline)(work, device, RetrievalConfig(fusion=fusion))
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
        "backends": {
            "all": (
                f"torch {torch.__version__} on {device}: grid_sample, {pipeline.precision_reason}, DINOv2 "
                f"{pipeline.compiled}, {str(pipeline.half).removeprefix('torch.')} matmul + topk search"
                if isinstance(pipeline, BestTorchPipeline)
                else f"torch {torch.__version__} eager on {device}, faiss IndexFlatIP fp32"
            )
        },
    }


# Orchestration ----------------------------------------------------------------------------------
def _worker(args: dict[str, Any]) -> dict[str, Any]:
    preset, work = PRESETS[args["preset"]], Path(args["work"])
    if args["pipeline"] in ("reference", "best"):
        return run_reference(work, preset, args["device"], args["fusion"], best=args["pipeline"] == "best")
    return run_engine(
        work,
        preset,
        args["backend"],
        args["device"],
        args["fusion"],
        args.get("save"),
        args.get("arrays"),
        args.get("precision"),
    )


def run_bench(
    preset_name: str,
    work: Path,
    out_dir: Path,
    name: str | None = None,
    say: Any = print,
    fusion: str = "out_of_vocab",
    device: str = "auto",
    dry_run: bool = False,
    index: str = "flat",
) -> dict[str, Any]:
    """Build, run every pipeline available here in its own process, write JSON, Markdown and a plot.

    ``device``: ``"auto"`` (CUDA where a model backend can run there), ``"cpu"`` or ``"cuda"``
    (a ``BackendUnavailableError`` where none can, unless ``dry_run``: then the device pipelines
    run their code on the CPU, with torch tensors for the device's arrays)."""
    preset = PRESETS[preset_name]
    from knnclip.engine.backends import cuda_usable

    asked = device
    if device == "auto":
        device = "cuda" if cuda_usable() else "cpu"
    elif device == "cuda" and not cuda_usable() and not dry_run:
        from knnclip.engine.errors import BackendUnavailableError

        raise BackendUnavailableError(
            "--device cuda: no model backend can run on a CUDA device here (a GPU, and onnxruntime-gpu, TensorRT "
            "with pycuda or torch with CUDA: docs/backends.md); --dry-run runs the device pipeline's code on the CPU"
        )
    work.mkdir(parents=True, exist_ok=True)
    run_on = "cpu" if dry_run else device
    # CPU backends run the GridSample form fastest (and OpenVINO's bf16 needs it); TensorRT the gathers.
    sampling = "gather" if run_on == "cuda" else "grid"
    flops = build(preset, work, say, sampling=sampling, index=index)
    pipelines = device_pipelines() if dry_run else engine_pipelines(device)
    pipelines.append(("torch reference", {"pipeline": "reference", "device": run_on}))
    best: dict[str, Any] = {"pipeline": "best", "device": run_on}
    if dry_run:  # its first call compiles DINOv2, which on a CPU is most of the run and shows nothing
        best["skip"] = "dry run: torch.compile's compilation would dominate a CPU run"
    pipelines.append(("torch best", best))
    results = {}
    saved: dict[str, Path] = {}
    for label, args in pipelines:
        if "skip" in args:  # a pipeline this machine cannot run is reported, not failed
            say(f"skipping {label}: {args['skip']}")
            results[label] = {"skipped": args["skip"]}
            continue
        say(f"running {label} ...")
        if args["pipeline"] == "engine":
            saved[label] = work / f"semantic-{label.replace(' ', '-')}.npz"
            args = {**args, "save": str(saved[label])}
        results[label] = harness.spawn_module(
            WORKER_MODULE, {**args, "preset": preset_name, "work": str(work), "fusion": fusion}
        )
        if "error" in results[label]:
            say(f"  {label}: {results[label]['error']}")
    agreement = semantic_agreement(saved, results)
    outputs = output_agreement(
        work, [(label, args) for label, args in pipelines if args["pipeline"] == "engine" and "skip" not in args]
    )
    from knnclip.engine.database import Database

    with Database.open(work / "db", read_only=True) as db:
        stats = db.stats()
    report = {
        "command": f"knnclip bench --preset {preset_name}"
        + ("" if fusion == "out_of_vocab" else f" --fusion {fusion}")
        + ("" if asked == "auto" else f" --device {asked}")
        + (" --dry-run" if dry_run else "")
        + ("" if index == "flat" else f" --index {index}"),
        "dry_run": dry_run,
        "fusion": fusion,
        "sampling": sampling,
        "preset": dataclasses.asdict(preset),
        "machine": harness.machine(),
        "device": device,
        "flops_per_image": flops,
        "floor": floor(flops, work / "models", stats),
        "database": {
            "entries": stats["entries"],
            "dim": stats["dim"],
            "storage": stats["storage"],
            "index": stats["index"],
            "bytes_read_per_search": stats["entries"] * stats["code_bytes_per_entry"],
        },
        "semantic_agreement_with_fp32": agreement,
        "output_agreement_with_fp32": outputs,
        "pipelines": {
            label: r
            if not _ran(r)
            else {
                **r,
                "stages": {s: percentiles(v) for s, v in r["stages_ms"].items() if v},
            }
            for label, r in results.items()
        },
    }
    name = name or f"end_to_end-{preset_name}-{harness.machine_slug()}"
    harness.write_json(name, report, out_dir)
    harness.write_text(f"{name}.md", markdown(report), out_dir)
    _plot(report, out_dir / f"{name}.png")
    say(markdown(report))
    return report


def device_pipelines() -> list[tuple[str, dict[str, Any]]]:
    """The dry run's engine pipelines: the host pipeline and the device pipeline's code on the CPU."""
    return [
        ("engine onnxruntime fp32", {"pipeline": "engine", "backend": "onnxruntime", "device": "cpu"}),
        (
            "engine device-path fp32 (dry run)",
            {"pipeline": "engine", "backend": "onnxruntime", "device": "cpu", "arrays": "torch-cpu"},
        ),
    ]


def floor(flops: dict[str, float], models: Path, stats: dict[str, Any]) -> dict[str, Any]:
    """The least time an image can take on :data:`FLOOR_GPU`: its arithmetic at the GPU's fp16 peak,
    and its memory traffic at the GPU's bandwidth (both models' weights read once in fp16, the
    database's codes read once per search); the larger of the two is the floor. The fp32 weights
    are the ONNX graph's files as the manifests list them (the graph, and its external data past
    2 GiB), halved for fp16."""
    from knnclip.engine.artifact import read_manifest

    weights = 0
    for part in ("fcclip/image", "dinov2"):
        files = read_manifest(models / part, verify_files=False).files
        weights += sum(files[role].bytes for role in ("model", "data") if role in files) // 2
    searched = stats["entries"] * stats["code_bytes_per_entry"]
    work = flops.get("fcclip", 0.0) + flops.get("dinov2", 0.0)
    compute_ms = 1e3 * work / FLOOR_GPU["fp16_flops"]
    memory_ms = 1e3 * (weights + searched) / FLOOR_GPU["bytes_per_s"]
    return {
        "gpu": FLOOR_GPU,
        "flops": work,
        "weight_bytes_fp16": weights,
        "search_bytes": searched,
        "compute_ms": compute_ms,
        "memory_ms": memory_ms,
        "floor_ms": max(compute_ms, memory_ms),
    }


def engine_pipelines(device: str) -> list[tuple[str, dict[str, Any]]]:
    """``engine <backend> <precision>`` for every backend and precision available here."""
    import importlib.util

    def engine(backend: str, on: str) -> dict[str, Any]:
        return {"pipeline": "engine", "backend": backend, "device": on}

    from knnclip.engine.cpu_features import bf16_missing

    out = [("engine onnxruntime fp32", engine("onnxruntime", device))]
    if device == "cuda":
        out.append(("engine tensorrt fp16", {**engine("tensorrt", "cuda"), "precision": "fp16"}))
        out.append(("engine tensorrt fp32", engine("tensorrt", "cuda")))
        out.append(("engine torch fp32", engine("torch", "cuda")))  # device outputs with torch alone
    if importlib.util.find_spec("openvino") is not None:
        out.append(("engine openvino fp32", engine("openvino", "cpu")))
        no_bf16 = bf16_missing()
        bf16 = engine("openvino-bf16", "cpu")
        out.append(("engine openvino bf16", bf16 if no_bf16 is None else {**bf16, "skip": no_bf16}))
        if device == "cpu":  # what a user gets by default: the faster of the two per model, measured
            out.append(("engine auto fp32", engine("auto", "cpu")))
    return out


def output_agreement(work: Path, pipelines: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Each engine pipeline's model outputs against ONNX Runtime fp32 on one normalised random
    input: relative L2 error per output, and for FC-CLIP's mask logits the fraction of pixels
    binarised alike (logit > 0), which is what the masks are made of."""
    from knnclip.engine.backends import open_session

    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for part in ("fcclip/image", "dinov2"):
        reference = open_session(work / "models" / part, "onnxruntime", "cpu")
        feed = {}
        for spec in reference.inputs:
            shape = [d if isinstance(d, int) else 1 for d in spec.shape]
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        want = reference.infer(feed)
        reference.close()
        for label, args in pipelines:
            if args["backend"] == "onnxruntime":
                continue
            try:
                with open_session(work / "models" / part, args["backend"], args["device"]) as session:
                    got = session.infer(feed)
            except Exception as exc:  # noqa: BLE001 - reported beside the pipeline's own error, if any
                out.setdefault(label, {})[part] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            row = {name: float(np.linalg.norm(got[name] - w) / (np.linalg.norm(w) or 1.0)) for name, w in want.items()}
            if "mask_logits" in want:
                row["mask_binarisation_agreement"] = float(
                    np.mean((got["mask_logits"] > 0) == (want["mask_logits"] > 0))
                )
            out.setdefault(label, {})[part] = row
    return out


def semantic_agreement(saved: dict[str, Path], results: dict[str, Any]) -> dict[str, float]:
    """Fraction of pixels whose semantic class equals the ``engine onnxruntime fp32`` pipeline's."""
    reference = saved.get("engine onnxruntime fp32")
    if reference is None or not reference.is_file():
        return {}
    with np.load(reference) as ref:
        want = [ref[k] for k in ref.files]
    out = {}
    for label, path in saved.items():
        if label == "engine onnxruntime fp32" or not _ran(results.get(label, {"error": 1})) or not path.is_file():
            continue
        with np.load(path) as got:
            maps = [got[k] for k in got.files]
        same = sum(int((a == b).sum()) for a, b in zip(maps, want, strict=True))
        out[label] = same / sum(a.size for a in want)
    return out


def markdown(report: dict[str, Any]) -> str:
    pipes = {k: v for k, v in report["pipelines"].items() if _ran(v)}
    ref = pipes.get("torch reference")
    lines = [
        f"# End to end: `{report['command']}` on {report['machine']['name']} ({report['device']}"
        + (", its code run on the CPU: the numbers are not the device's)" if report.get("dry_run") else ")"),
        "",
        "Per-stage latency per image, p50 (p90) in ms over the timed images after a warm-up image;"
        " ratio = reference p50 / engine p50 (above 1: the engine is faster). 'fuse' includes classification.",
        "",
    ]
    engines = {k: v for k, v in pipes.items() if k.startswith("engine ")} if ref else {}
    header = (
        "| stage | "
        + " | ".join(pipes)
        + " |"
        + "".join(f" reference / {k.removeprefix('engine ')} |" for k in engines)
    )
    lines += [header, "|---|" + "---|" * (len(pipes) + len(engines))]
    for stage in STAGES:
        cells = []
        for p in pipes.values():
            s = p["stages"].get(stage)
            cells.append(f"{s['p50']:.1f} ({s['p90']:.1f})" if s else "-")
        ratios = []
        for engine in engines.values():
            assert ref is not None  # engines are compared only where the reference ran
            e = engine["stages"].get(stage, {}).get("p50")
            r = ref["stages"].get(stage, {}).get("p50")
            ratios.append(f"{r / e:.2f}x" if e and r else "-")
        lines.append(f"| {stage} | " + " | ".join(cells + ratios) + " |")
    best = pipes.get("torch best")
    if best and engines:
        lines += [
            "",
            "End to end against `torch best` (its total p50 / the engine's): "
            + ", ".join(
                f"{k.removeprefix('engine ')}: {best['stages']['total']['p50'] / e['stages']['total']['p50']:.2f}x"
                for k, e in engines.items()
            )
            + f"; `torch best` is {best['backends']['all']}.",
        ]
    auto = pipes.get("engine auto fp32")
    if auto and "backend_per_model" in auto:
        opened = ", ".join(f"{part} on {backend}" for part, backend in auto["backend_per_model"].items())
        lines += [
            "",
            f'`engine auto fp32` opened {opened} (`backend="auto"`: the faster of ONNX Runtime and '
            "OpenVINO fp32 for each model, measured once on this machine; docs/backends.md).",
        ]
    agreement = report.get("semantic_agreement_with_fp32") or {}
    if agreement:
        lines += [
            "",
            "Semantic pixel agreement with `engine onnxruntime fp32` over the timed images: "
            + ", ".join(f"{k}: {v:.2%}" for k, v in agreement.items())
            + " (with seeded random weights each map is nearly one class, so this is a weak test; the"
            " model outputs below are the stronger one).",
        ]
    outputs = report.get("output_agreement_with_fp32") or {}
    for label, parts in outputs.items():
        cells = []
        for part, row in parts.items():
            if "error" in row:
                cells.append(f"{part}: {row['error'][:80]}")
                continue
            errors = ", ".join(f"{k} {v:.1e}" for k, v in row.items() if k != "mask_binarisation_agreement")
            flips = row.get("mask_binarisation_agreement")
            cells.append(
                f"{part}: {errors}" + (f", mask pixels binarised alike {flips:.2%}" if flips is not None else "")
            )
        lines.append(f"- {label} against onnxruntime fp32 (relative L2 per output): " + "; ".join(cells))
    lines += ["", "| pipeline | throughput (images/s) by concurrent requests | peak RSS over baseline |"]
    lines.append("|---|---|---|")
    for label, p in pipes.items():
        t = ", ".join(f"{k}: {v:.2f}" for k, v in p["throughput_images_per_s"].items())
        lines.append(f"| {label} | {t} | {p['peak_rss_mib']:.0f} MiB |")
    for label, p in report["pipelines"].items():
        if "error" in p:
            lines.append(f"| {label} | error: {p['error']} | |")
        elif "skipped" in p:
            lines.append(f"| {label} | skipped: {p['skipped']} | |")
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
    lines += _device_lines(report, pipes)
    return "\n".join(lines)


def _device_lines(report: dict[str, Any], pipes: dict[str, Any]) -> list[str]:
    """Bytes moved between host and device, device memory, batch throughput and the floor."""
    lines = []
    moving = {k: p for k, p in pipes.items() if p.get("bytes_moved_per_image", {}).get("to_device")}
    if moving:
        lines += [
            "| pipeline | arrays | to the device per image | to the host per image | device memory | "
            "images/s at batch 1, 4, 8 |",
            "|---|---|---|---|---|---|",
        ]
        for label, p in moving.items():
            cells = [
                ", ".join(f"{kind} {n / 1024:.0f} KiB" for kind, n in p["bytes_moved_per_image"][d].items())
                for d in ("to_device", "to_host")
            ]
            memory = f"{p['device_memory_mib']:.0f} MiB" if "device_memory_mib" in p else "-"
            batches = ", ".join(f"{v:.1f}" for v in p.get("throughput_by_batch_images_per_s", {}).values()) or "-"
            lines.append(f"| {label} | {p.get('arrays', '-')} | {cells[0]} | {cells[1]} | {memory} | {batches} |")
        lines += [
            "",
            "Per image, only the image's tensors go in (per-vocabulary constants went once, before), and "
            "only the label maps, the segment table and the evidence come out.",
        ]
    f = report.get("floor")
    if f:
        lines += [
            "",
            f"Floor on an {f['gpu']['name']} ({f['gpu']['fp16_flops'] / 1e12:.0f} TFLOP/s fp16, "
            f"{f['gpu']['bytes_per_s'] / 1e12:.2f} TB/s): {f['flops'] / 1e9:.0f} GFLOP of model arithmetic is "
            f"{f['compute_ms']:.2f} ms; {f['weight_bytes_fp16'] / 2**20:.0f} MiB of fp16 weights and "
            f"{f['search_bytes'] / 2**20:.0f} MiB of database codes read are {f['memory_ms']:.2f} ms; "
            f"no pipeline can beat {f['floor_ms']:.2f} ms per image there.",
            "",
        ]
    return lines


def _plot(report: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    if plt is None:
        return
    pipes = {k: v for k, v in report["pipelines"].items() if _ran(v)}
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


def _ran(result: dict[str, Any]) -> bool:
    """Whether a pipeline's result holds timings (not an error, not skipped on this machine)."""
    return "error" not in result and "skipped" not in result


def _worker_main(case: dict[str, Any]) -> dict[str, Any]:
    """The worker's result, or the library's error as one line: a backend this machine cannot run
    is a skip, any other refusal an error (a crash still ends the process, read by the parent)."""
    from knnclip.engine.errors import BackendUnavailableError, KnnclipError

    try:
        return _worker(case)
    except BackendUnavailableError as exc:
        return {"skipped": str(exc)}
    except KnnclipError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


if __name__ == "__main__":
    print(json.dumps(_worker_main(json.loads(sys.argv[1]))))
