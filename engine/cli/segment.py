"""``knnclip segment``, ``knnclip add-class`` and ``knnclip add-concept``.

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

from knnclip.engine.cli.common import backend_options, open_segmenter, progress_items
from knnclip.engine.errors import KnnclipError


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
    with open_segmenter(args, read_only=True) as seg:
        for path in progress_items(args.images, "segment", args.json):
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
    with open_segmenter(args, read_only=False) as seg:
        info = seg.add_class(args.name, args.synonym or (), thing=args.thing)
    print(json.dumps(info.to_json()) if args.json else f"class {info.name!r} (id {info.id}) is in the vocabulary")
    return 0


def _add_concept(args: argparse.Namespace) -> int:
    with open_segmenter(args, read_only=False) as seg:
        scores = seg.add_concept(args.name, args.images, thing=args.thing, min_similarity=args.min_similarity)
    floor = -np.inf if args.min_similarity is None else args.min_similarity
    added = sum(s >= floor for s in scores if s == s)  # NaN: no mask in that image
    if args.json:
        print(json.dumps({"name": args.name, "similarities": scores, "added": added}))
    else:
        print(f"{args.name!r}: added {added} of {len(scores)} images' best-matching masks")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    backend_options(p)
    p.add_argument("--db", required=True, help="database directory (created when missing, for commands that add)")


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
