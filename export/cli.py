"""The work behind ``knnclip export`` (see ``knnclip.engine.cli_export`` for the arguments)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from knnclip.engine._fsutil import sha256_file


def run(args: argparse.Namespace) -> int:
    if args.model == "dinov2":
        return _dinov2(args)
    raise ValueError(f"unknown model {args.model!r}")


def _dinov2(args: argparse.Namespace) -> int:
    from knnclip.export.dinov2 import load_dinov2
    from knnclip.export.onnx import export_dinov2_onnx, parse_size

    size = parse_size(args.size)
    model = load_dinov2(args.checkpoint, args.config)
    extra = {}
    checkpoint = Path(args.checkpoint)
    if checkpoint.is_file():
        extra["checkpoint"] = {"name": checkpoint.name, "sha256": sha256_file(checkpoint)}
    result = export_dinov2_onnx(
        model, args.out, size=size, fp16=args.fp16, opset=args.opset, overwrite=args.overwrite, extra=extra
    )
    if args.json:
        print(json.dumps(result.manifest, indent=1))
    else:
        m = result.manifest
        print(
            f"exported {m['model']['name']} keys at {size[0]}x{size[1]} ({m['precision']}, opset {m['opset']}) "
            f"to {result.model_path}; ONNX Runtime vs torch: {result.rel_l2_error:.2e} relative L2 error"
        )
    return 0
