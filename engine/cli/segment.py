"""``knnclip segment``, ``knnclip add-class``, ``knnclip add-concept`` and ``knnclip demo``.

``segment`` writes, per image, ``NAME.json`` (segments, evidence, timings), ``NAME.semantic.png``
(16-bit class ids), ``NAME.panoptic.png`` (16-bit segment ids, 0 = void) and, with ``--overlay``,
``NAME.overlay.png``. A failed image is reported and the others go on; the exit code is 1 if
any image failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from knnclip.engine.errors import KnnclipError


def _progress(items: list, label: str, quiet: bool):
    """tqdm over ``items`` when installed and wanted; the items themselves otherwise."""
    if quiet or not sys.stderr.isatty():
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=label, unit="image")


def _open_segmenter(args: argparse.Namespace, read_only: bool):
    from knnclip.engine.config import RetrievalConfig
    from knnclip.engine.pipeline.segmenter import Segmenter

    base = RetrievalConfig.from_file(args.config) if getattr(args, "config", None) else RetrievalConfig()
    config = base.replace(**{k: v for k in ("k", "tau", "T", "lam") if (v := getattr(args, k, None)) is not None})
    return Segmenter.from_dir(
        args.models, args.db, backend=args.backend, device=args.device, config=config, read_only=read_only
    )


def _write_png16(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    from knnclip.engine.render import save_png

    if array.max(initial=0) > 65535 or array.min(initial=0) < 0:
        raise KnnclipError(f"{path}: ids outside 0..65535 cannot be written as a 16-bit PNG")
    save_png(Image.fromarray(array.astype(np.uint16)), path)


def _segment(args: argparse.Namespace) -> int:
    from knnclip.engine.pipeline.preprocess import load_image
    from knnclip.engine.render import overlay, save_png

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    report = []
    with _open_segmenter(args, read_only=True) as seg:
        for path in _progress(args.images, "segment", args.json):
            stem = Path(path).stem
            try:
                pixels = load_image(path)
                result = seg.segment(pixels, name=path)
            except KnnclipError as exc:
                failures += 1
                report.append({"image": path, "error": str(exc)})
                print(f"knnclip: {exc}", file=sys.stderr)  # the message names the image
                continue
            data = result.to_json()
            (out / f"{stem}.json").write_text(json.dumps(data, indent=1))
            _write_png16(result.semantic, out / f"{stem}.semantic.png")
            if args.panoptic:
                _write_png16(result.panoptic, out / f"{stem}.panoptic.png")
            if args.overlay:
                picture = overlay(pixels, result.semantic, result.classes, result.panoptic if args.panoptic else None)
                save_png(picture, out / f"{stem}.overlay.png")
            report.append(data)
            if not args.json:
                names = ", ".join(sorted({s.name for s in result.segments})) or "no segments"
                print(f"{path}: {names} ({result.timings['total']:.0f} ms)")
    if args.json:
        print(json.dumps(report, indent=1))
    return 1 if failures else 0


def _add_class(args: argparse.Namespace) -> int:
    with _open_segmenter(args, read_only=False) as seg:
        info = seg.add_class(args.name, args.synonym or (), thing=args.thing)
    print(json.dumps(info.to_json()) if args.json else f"class {info.name!r} (id {info.id}) is in the vocabulary")
    return 0


def _add_concept(args: argparse.Namespace) -> int:
    with _open_segmenter(args, read_only=False) as seg:
        scores = seg.add_concept(args.name, args.images, thing=args.thing, min_similarity=args.min_similarity)
    floor = -np.inf if args.min_similarity is None else args.min_similarity
    added = sum(s >= floor for s in scores if s == s)  # NaN: no mask in that image
    if args.json:
        print(json.dumps({"name": args.name, "similarities": scores, "added": added}))
    else:
        print(f"{args.name!r}: added {added} of {len(scores)} images' best-matching masks")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from knnclip.engine.demo.run import DemoSettings, run_demo

    def config(value: str | None):
        if value is None:
            return None
        path = Path(value)
        return json.loads(path.read_text() if path.is_file() else value)

    settings = DemoSettings(
        out=Path(args.out), train=args.train, val=args.val, seed=args.seed, fcclip=args.fcclip,
        fcclip_config=config(args.fcclip_config), dinov2=args.dinov2, dinov2_config=config(args.dinov2_config),
    )  # fmt: skip
    report = run_demo(settings, say=(lambda _: None) if args.json else print)
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from knnclip.engine.bench.end_to_end import run_bench

    preset = "full" if args.full else "quick" if args.quick else args.preset
    report = run_bench(preset, Path(args.work), Path(args.out), args.name, say=(lambda _: None) if args.json else print)
    if args.json:
        print(json.dumps(report, indent=1))
    failed = [k for k, v in report["pipelines"].items() if "error" in v]
    return 1 if failed else 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", required=True, help="models directory (fcclip/image, fcclip/text, dinov2)")
    p.add_argument("--db", required=True, help="database directory (created when missing, for commands that add)")
    p.add_argument("--backend", default="auto", choices=["auto", "tensorrt", "onnxruntime", "torch"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print JSON for scripts")


def add_parser(commands: argparse._SubParsersAction) -> None:
    seg = commands.add_parser("segment", help="segment images (semantic and panoptic) with a database")
    seg.add_argument("images", nargs="+", help="image files")
    _common(seg)
    seg.add_argument("--out", required=True, help="directory for the outputs")
    seg.add_argument("--panoptic", action="store_true", help="also write the panoptic segment-id PNG")
    seg.add_argument("--overlay", action="store_true", help="also write an overlay PNG per image")
    for name, kind, text in (("k", int, "neighbours"), ("tau", float, "temperature"), ("T", float, "fusion threshold"),
                             ("lam", float, "fusion weight")):  # fmt: skip
        seg.add_argument(f"--{name}", type=kind, help=f"retrieval {text} (default: RetrievalConfig)")
    seg.add_argument("--config", help="retrieval settings JSON (knnclip eval sweep --write-config)")
    seg.set_defaults(run=_segment)

    cls = commands.add_parser("add-class", help="add a class name (with synonyms) to the vocabulary")
    cls.add_argument("name")
    cls.add_argument("--synonym", action="append", help="another name of the class (repeatable)")
    cls.add_argument("--thing", action=argparse.BooleanOptionalAction, default=None, help="countable objects")
    _common(cls)
    cls.set_defaults(run=_add_class)

    concept = commands.add_parser(
        "add-concept", help="add a concept from unlabelled images (the mask that best matches its name)"
    )
    concept.add_argument("name")
    concept.add_argument("images", nargs="+")
    concept.add_argument("--thing", action=argparse.BooleanOptionalAction, default=None)
    concept.add_argument("--min-similarity", type=float, help="skip images whose best mask scores lower")
    _common(concept)
    concept.set_defaults(run=_add_concept)

    demo = commands.add_parser(
        "demo", help="the whole engine on synthetic data, CPU, no downloads (random weights unless given)"
    )
    demo.add_argument("--out", default="knnclip-demo", help="working directory (default ./knnclip-demo)")
    demo.add_argument("--train", type=int, default=48, help="training images (default 48)")
    demo.add_argument("--val", type=int, default=16, help="validation images (default 16)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--fcclip", help="a real FC-CLIP checkpoint instead of seeded weights")
    demo.add_argument("--fcclip-config", help="its config (JSON or file); default ConvNeXt-L")
    demo.add_argument("--dinov2", help="a real DINOv2 checkpoint instead of seeded weights")
    demo.add_argument("--dinov2-config", help="its config (JSON, file or preset); default ViT-g/14-reg4")
    demo.add_argument("--json", action="store_true", help="print the report as JSON")
    demo.set_defaults(run=_demo)

    bench = commands.add_parser(
        "bench", help="per-stage latency, throughput and memory, engine vs a PyTorch eager reference pipeline"
    )
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="reduced models on a CPU, under 5 minutes on 2 cores")
    size.add_argument("--full", action="store_true", help="the real model sizes, 10^6 entries: for a GPU")
    size.add_argument("--preset", default="quick", choices=["tiny", "quick", "full"])
    bench.add_argument("--work", default="knnclip-bench", help="working directory for models and the database")
    bench.add_argument("--out", default="benchmarks/results", help="where the JSON, Markdown and PNG go")
    bench.add_argument("--name", help="results file stem (default end_to_end-PRESET-MACHINE)")
    bench.add_argument("--json", action="store_true", help="print the report as JSON")
    bench.set_defaults(run=_bench)
