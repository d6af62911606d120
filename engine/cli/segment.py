"""``knnclip segment``, ``knnclip add-class`` and ``knnclip add-concept``.

``segment`` runs images through ``segment_batch``, ``--batch-size`` at a time, and writes them
with :class:`knnclip.engine.formats.ResultWriter`: per image ``NAME.json`` (the result record),
``NAME.semantic.png`` (class ids; 8-bit, 16-bit past 255), ``NAME.panoptic.png`` (segment ids,
0 = void) and, with ``--overlay``, ``NAME.overlay.png``; ``--format`` adds COCO instance results
and COCO panoptic. A failed image is reported and the others go on; the exit code is 1 if any
image failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from knnclip.engine.cli.common import backend_options, open_segmenter, progress_items, search_option
from knnclip.engine.errors import KnnclipError, UsageError

MAX_STEM_BYTES = 120  # leaves room for ".semantic.png" and the like within a file system's 255 bytes


def output_stems(inputs: list[str]) -> list[str]:
    """One distinct output stem per input: its file stem, shortened (with a hash of the whole
    name) where it is too long for a file name, and numbered (``x-2``) where inputs share one
    (``x.png`` and ``x.jpg``, or ``a/x.png`` and ``b/x.png``), so no output overwrites another."""
    import hashlib

    used: set[str] = set()
    stems = []
    for spec in inputs:
        stem = Path(spec).stem or "image"
        if len(stem.encode()) > MAX_STEM_BYTES:
            digest = hashlib.sha256(stem.encode()).hexdigest()[:12]
            # 13 bytes for "-" and the digest, 8 more for a number added below
            stem = stem.encode()[: MAX_STEM_BYTES - 21].decode(errors="ignore") + "-" + digest
        candidate, n = stem, 1
        while candidate in used:
            n += 1
            candidate = f"{stem}-{n}"
        used.add(candidate)
        stems.append(candidate)
    return stems


def _segment(args: argparse.Namespace) -> int:
    from knnclip.engine.video.source import is_video_source

    if args.server:
        return _segment_remote(args)
    if args.models is None or args.db is None:
        raise UsageError("segment needs --models and --db, or --server URL")
    videos = [spec for spec in args.images if is_video_source(spec)]
    if videos:
        if len(args.images) != 1:
            raise UsageError("segment one video (file, stream, camera or -) at a time, without images beside it")
        return _segment_video(args, videos[0])
    from knnclip.engine.formats import ResultWriter
    from knnclip.engine.pipeline.preprocess import load_image

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    writer = ResultWriter(Path(args.out), args.format, panoptic=args.panoptic, overlay=args.overlay)
    report: list[dict[str, Any]] = []
    stems = dict(zip(args.images, output_stems(args.images), strict=True))
    with open_segmenter(args, read_only=True) as seg:
        for paths in _chunks(progress_items(args.images, "segment", args.json), args.batch_size):
            results = seg.segment_batch(paths, instance="coco-instances" in writer.formats, batch_size=len(paths))
            for path, result in zip(paths, results, strict=True):
                try:
                    if isinstance(result, BaseException):
                        raise result
                    pixels = load_image(path) if args.overlay else None  # segment_batch keeps no pixels
                    record = writer.write(stems[path], result, pixels)
                except (KnnclipError, OSError) as exc:  # this image fails alone; the others go on
                    report.append({"image": path, "error": str(exc)})
                    print(f"knnclip: {path}: {exc}", file=sys.stderr)
                    continue
                report.append({**record, "outputs": stems[path]})  # the stem of its files (inputs can share one)
                if not args.json:
                    names = ", ".join(sorted({s.name for s in result.segments})) or "no segments"
                    print(f"{path}: {names} ({result.timings['total']:.0f} ms)")
        writer.close(seg.db.vocabulary.values())
    if args.json:
        print(json.dumps(report, indent=1))
    return 1 if any("error" in r for r in report) else 0


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _segment_remote(args: argparse.Namespace) -> int:
    """``--server URL``: each image through a knnclip server, written as local results are."""
    import os

    from knnclip.engine.formats import ResultWriter
    from knnclip.engine.serve.client import Client

    unsupported = set(args.format) - {"json", "label-png"}
    if unsupported or args.overlay:
        raise UsageError("with --server, segment writes json and label-png (no COCO files or overlays)")
    writer = ResultWriter(Path(args.out), args.format, panoptic=args.panoptic)
    failures = 0
    with Client(args.server, os.environ.get("KNNCLIP_SERVE_TOKEN") or None, retries=3) as client:
        stems = dict(zip(args.images, output_stems(args.images), strict=True))
        for path in progress_items(args.images, "segment", args.json):
            try:
                result = client.segment(Path(path), panoptic=True)
                result.name = path
                writer.write(stems[path], result)
            except (KnnclipError, OSError) as exc:  # this image fails alone; the others go on
                failures += 1
                print(f"knnclip: {path}: {exc}", file=sys.stderr)
                continue
            if not args.json:
                names = ", ".join(sorted({s.name for s in result.segments})) or "no segments"
                print(f"{path}: {names} ({result.timings.get('total', 0.0):.0f} ms on the server)")
    return 1 if failures else 0


def _segment_video(args: argparse.Namespace, spec: str) -> int:
    """A video source: the annotated video, frames.jsonl and optional PNGs into ``--out``."""
    from knnclip.engine.formats import write_json
    from knnclip.engine.video.outputs import VideoOutputs
    from knnclip.engine.video.pipeline import segment_video
    from knnclip.engine.video.source import VideoSource

    source = VideoSource(spec, timeout=args.timeout, reconnects=args.reconnects)  # fails before anything starts
    realtime = source.live if args.realtime is None else args.realtime
    try:
        seg = open_segmenter(args, read_only=True)
    except BaseException:
        source.close()
        raise
    with seg:
        kept_fps = source.fps / args.stride if args.max_fps is None else min(source.fps / args.stride, args.max_fps)
        outputs = VideoOutputs(
            Path(args.out),
            kept_fps,
            source.codec,
            codec=args.video_codec,
            pngs=args.png_frames,
            video=not args.no_video,
        )
        from knnclip.engine.cli.progress import progress_callback

        progress = progress_callback("video", args.json, unit="frame")
        counted = iter(range(1, 1 << 62))

        def on_result(frame: object, result: object) -> None:
            if progress is not None:
                progress(next(counted), 0)  # a stream's length is unknown

        try:
            report = segment_video(
                seg,
                source,
                outputs,
                batch_size=args.batch_size,
                stride=args.stride,
                max_fps=args.max_fps,
                realtime=realtime,
                on_result=on_result,
            )
        except KeyboardInterrupt:
            print(f"knnclip: interrupted; {outputs.jsonl_path} and {outputs.video_path} are closed", file=sys.stderr)
            return 130
    # Name only the files this run wrote (a source with no frame leaves no video).
    written = {
        k: str(p)
        for k, p in (("video", outputs.video_path), ("frames_jsonl", outputs.jsonl_path))
        if p.is_file() and p.stat().st_size > 0
    }
    data = {**report.to_json(), **written}
    write_json(Path(args.out) / "report.json", data, indent=1)
    if args.json:
        print(json.dumps(data, indent=1))
    elif report.frames_read:
        print(
            f"{spec}: {report.frames_segmented} frames segmented at {report.fps:.1f} fps "
            f"({report.dropped} dropped, {report.skipped} skipped, {report.corrupt_frames} corrupt, "
            f"{report.reconnects} reconnects)" + (f" -> {written['video']}" if "video" in written else "")
        )
    if report.error:
        print(f"knnclip: error: {report.error}", file=sys.stderr)
    return 1 if report.error or report.frames_failed else 0


def _add_class(args: argparse.Namespace) -> int:
    with open_segmenter(args, read_only=False) as seg:
        info = seg.add_class(args.name, args.synonym or (), thing=args.thing)
    print(json.dumps(info.to_json()) if args.json else f"class {info.name!r} (id {info.id}) is in the vocabulary")
    return 0


def _add_concept(args: argparse.Namespace) -> int:
    with open_segmenter(args, read_only=False) as seg:
        added = seg.add_concept(
            args.name,
            args.images,
            thing=args.thing,
            mask_confidence=args.mask_confidence,
            class_confidence=args.class_confidence,
        )
    images = len({a.image for a in added})
    if args.json:
        print(json.dumps({"name": args.name, "added": [vars(a) for a in added]}))
    else:
        print(f"{args.name!r}: added {len(added)} masks from {images} of {len(args.images)} images")
    return 0


def _common(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    backend_options(p, models_required=required)
    search_option(p)
    p.add_argument("--db", required=required, help="database directory (created when missing, for commands that add)")


def add_parser(commands: argparse._SubParsersAction) -> None:
    seg = commands.add_parser("segment", help="segment images (semantic and panoptic) with a database")
    seg.add_argument("images", nargs="+", help="image files, or one video source (see below)")
    _common(seg, required=False)
    seg.add_argument("--server", help="segment through a knnclip server at this URL (instead of --models/--db)")
    seg.add_argument("--out", required=True, help="directory for the outputs")
    seg.add_argument("--panoptic", action="store_true", help="also write the panoptic segment-id PNG")
    seg.add_argument(
        "--format",
        nargs="+",
        default=["json", "label-png"],
        choices=["json", "label-png", "coco-instances", "coco-panoptic"],
        help="what to write: NAME.json, label PNGs (8-bit, 16-bit past 255 classes), COCO "
        "instance results (coco_instances.json, RLE; with coco_images.json), COCO panoptic (panoptic/*.png with "
        "panoptic.json); default json label-png",
    )
    seg.add_argument("--overlay", action="store_true", help="also write an overlay PNG per image")
    seg.add_argument("--batch-size", type=int, default=4, help="images (or video frames) per model call")
    for name, kind, text in (
        ("k", int, "neighbours"),
        ("tau", float, "temperature"),
        ("T", float, "fusion threshold"),
        ("lam", float, "fusion weight"),
    ):
        seg.add_argument(f"--{name}", type=kind, help=f"retrieval {text} (default: RetrievalConfig)")
    seg.add_argument("--config", help="retrieval settings JSON (knnclip eval sweep --write-config)")
    video = seg.add_argument_group("video (VIDEO.mp4, rtsp://..., http(s)://..., /dev/videoN, or - for stdin)")
    video.add_argument(
        "--realtime",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="drop the oldest waiting frames when the engine falls behind (default: on for streams and cameras)",
    )
    video.add_argument("--stride", type=int, default=1, help="segment every N-th frame")
    video.add_argument("--max-fps", type=float, help="segment at most this many frames per second of video")
    video.add_argument("--png-frames", action="store_true", help="also write frames/NNNNNN.png overlays")
    video.add_argument("--no-video", action="store_true", help="write frames.jsonl only, no annotated video")
    video.add_argument("--video-codec", help="encoder of the annotated video (default: the source's family)")
    video.add_argument("--timeout", type=float, default=10.0, help="seconds a stream may stall before a reconnect")
    video.add_argument("--reconnects", type=int, default=3, help="reconnects of a stalled stream before giving up")
    seg.set_defaults(run=_segment)

    cls = commands.add_parser("add-class", help="add a class name (with synonyms) to the vocabulary")
    cls.add_argument("name")
    cls.add_argument("--synonym", action="append", help="another name of the class (repeatable)")
    cls.add_argument("--thing", action=argparse.BooleanOptionalAction, default=None, help="countable objects")
    _common(cls)
    cls.set_defaults(run=_add_class)

    concept = commands.add_parser(
        "add-concept",
        help="add a concept from unlabelled images: every proposed mask above both confidences is added",
    )
    concept.add_argument("name")
    concept.add_argument("images", nargs="+")
    concept.add_argument("--thing", action=argparse.BooleanOptionalAction, default=None)
    concept.add_argument("--mask-confidence", type=float, help="minimum mean mask probability (config default 0.7)")
    concept.add_argument(
        "--class-confidence", type=float, help="minimum probability of being the concept (config default 0.5)"
    )
    _common(concept)
    concept.set_defaults(run=_add_concept)
