"""The work behind ``knnclip export`` (see ``knnclip.engine.cli.export`` for the arguments)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from knnclip.engine.errors import InvalidInputError
from knnclip.engine.fsutil import sha256_file


def run(args: argparse.Namespace) -> int:
    if args.model == "dinov2":
        return _dinov2(args)
    if args.model == "fcclip":
        return _fcclip(args)
    raise ValueError(f"unknown model {args.model!r}")


def _dinov2(args: argparse.Namespace) -> int:
    from knnclip.export.dinov2 import load_dinov2
    from knnclip.export.dinov2.onnx import export_dinov2_onnx
    from knnclip.export.onnx import parse_size

    size = parse_size(args.size)
    model = load_dinov2(args.checkpoint, args.config)
    result = export_dinov2_onnx(
        model,
        args.out,
        size=size,
        fp16=args.fp16,
        opset=args.opset,
        overwrite=args.overwrite,
        extra=_checkpoint_record(args.checkpoint),
        torch_weights=args.torch_weights,
    )
    if args.json:
        print(json.dumps(result.manifest.to_json(), indent=1))
    else:
        m = result.manifest
        print(
            f"exported {m.model['name']} keys at {size[0]}x{size[1]} ({m.precision}, opset {m.body['opset']}) "
            f"to {result.model_path}; ONNX Runtime vs torch: {result.rel_l2_error:.2e} relative L2 error"
        )
    return 0


def _checkpoint_record(path: str) -> dict[str, object]:
    checkpoint = Path(path)
    return {"checkpoint": {"name": checkpoint.name, "sha256": sha256_file(checkpoint)}} if checkpoint.is_file() else {}


def _json_arg(value: str | None) -> dict | None:
    """A JSON object given inline or as a file name."""
    if value is None:
        return None
    text = Path(value).read_text() if Path(value).is_file() else value
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise InvalidInputError(f"--config is neither a JSON object nor a JSON file: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidInputError("--config must be a JSON object")
    return obj


def _fcclip(args: argparse.Namespace) -> int:
    from knnclip.engine.text.prompts import class_synonyms
    from knnclip.export.fcclip import load_fcclip
    from knnclip.export.fcclip.onnx import export_fcclip_onnx

    seen = None
    if args.seen_names:
        lines = [line for line in Path(args.seen_names).read_text().splitlines() if line.strip()]
        seen = [name for names in class_synonyms(lines) for name in names]
    elif "coco" not in Path(args.checkpoint).name.lower():
        print(
            f"knnclip: warning: {args.checkpoint}: no --seen-names, so COCO panoptic's 133 classes are taken as the "
            "training vocabulary (the official FC-CLIP checkpoints', e.g. fcclip_cocopan.pth); pass --seen-names "
            "for a checkpoint trained on something else, or classes get the wrong ensemble weight",
            file=sys.stderr,
        )
    model = load_fcclip(args.checkpoint, _json_arg(args.config))
    result = export_fcclip_onnx(
        model,
        args.out,
        size=args.size,
        seen_names=seen,
        opset=args.opset,
        overwrite=args.overwrite,
        extra=_checkpoint_record(args.checkpoint),
        fp16=args.fp16,
        torch_weights=args.torch_weights,
        sampling=args.sampling,
    )
    if args.json:
        print(json.dumps({"image": result.image.manifest.to_json(), "text": result.text.manifest.to_json()}, indent=1))
    else:
        for part in (result.image, result.text):
            print(
                f"exported {part.manifest.kind} to {part.model_path}; ONNX Runtime vs torch: "
                f"{part.rel_l2_error:.2e} relative L2 error (largest over outputs)"
            )
    return 0
