"""``knnclip export``: build deployable artefacts (ONNX) from model checkpoints.

The argument parser lives here, without torch; the work is done by ``knnclip.export.cli``,
imported only when the command runs (it needs the ``[export]`` extra: torch, onnx).
"""

from __future__ import annotations

import argparse

from knnclip.engine.errors import needs_extra


def _run(args: argparse.Namespace) -> int:
    from knnclip.engine.cli.progress import heartbeat

    try:
        from knnclip.export import cli
    except ImportError as exc:
        raise needs_extra(f"knnclip export ({exc})", "export") from None
    with heartbeat(f"knnclip export {args.model}", quiet=getattr(args, "json", False)):
        return cli.run(args)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``knnclip export`` and ``knnclip build``."""
    _add_build_parser(commands)
    export = commands.add_parser("export", help="export a model checkpoint to ONNX (needs torch, onnx)")
    models = export.add_subparsers(dest="model", metavar="MODEL", required=True)
    dino = models.add_parser(
        "dinov2",
        help="the DINOv2 keys model (last block's attention keys)",
        description="Export the DINOv2 keys model at a fixed input size to OUT/model.onnx with a manifest, "
        "after checking it with onnx.checker and against the torch model in ONNX Runtime.",
    )
    dino.add_argument(
        "--checkpoint",
        required=True,
        help="official hub .pth, Hugging Face .safetensors file or model directory, or hf://ORG/NAME",
    )
    dino.add_argument(
        "--config",
        help="a JSON object of official constructor arguments, a JSON file, or a preset "
        "(vits14, vitb14, vitl14, vitg14, each also _reg4); default: ViT-g/14-reg4, or the "
        "Hugging Face config.json beside the weights",
    )
    dino.add_argument("--size", default="518", help="input size H or HxW in pixels, multiples of 14 (default 518)")
    dino.add_argument("--out", required=True, help="artefact directory to create")
    dino.add_argument("--fp16", action="store_true", help="fp16 graph (LayerNorm, softmax, residuals stay fp32)")
    _artefact_options(dino, "replace OUT if it exists")
    fc = models.add_parser(
        "fcclip",
        help="FC-CLIP: the vocabulary-free image part and the CLIP text tower",
        description="Export FC-CLIP to OUT/image (images -> mask logits, class and CLIP embeddings, dense "
        "CLIP map) and OUT/text (tokens -> text features), each checked in ONNX Runtime against torch.",
    )
    fc.add_argument("--checkpoint", required=True, help="official FC-CLIP checkpoint (.pth, detectron2 layout)")
    fc.add_argument(
        "--config", help="a JSON object or file: our FCCLIPConfig JSON or the official settings; default ConvNeXt-L"
    )
    fc.add_argument(
        "--size",
        help="a fixed input size HxW, multiples of 32; default: dynamic spatial axes, so every image runs "
        "at FC-CLIP's own test size (short side 800, long side at most 1333, padded to 32)",
    )
    fc.add_argument(
        "--seen-names",
        help="text file of FC-CLIP's training class names (one class per line, synonyms comma-separated); "
        "classes named there get the ensemble's alpha, others beta (default: COCO panoptic's 133 classes, "
        "the official checkpoints' training set)",
    )
    fc.add_argument("--out", required=True, help="directory to create (OUT/image, OUT/text)")
    fc.add_argument("--fp16", action="store_true", help="fp16 image graph (norms, softmax, attention stay fp32)")
    fc.add_argument(
        "--sampling",
        default="gather",
        choices=["gather", "grid"],
        help="deformable attention's sampling: gather (every runtime, TensorRT) or grid (GridSample: faster on "
        "ONNX Runtime and OpenVINO CPUs, needed by --backend openvino-bf16)",
    )
    _artefact_options(fc, "replace OUT/image and OUT/text if they exist")


def _artefact_options(p: argparse.ArgumentParser, overwrite_help: str) -> None:
    """What every export takes: opset, torch weights, overwrite, JSON output."""
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 17 or newer (default 17)")
    p.add_argument(
        "--torch-weights", action="store_true", help="also save the weights for the torch backend (weights.pt)"
    )
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.add_argument("--json", action="store_true", help="print the manifest(s) as JSON")
    p.set_defaults(run=_run)


def _build(args: argparse.Namespace) -> int:
    try:
        from knnclip.engine.backends.tensorrt.builder import (
            BuildSettings,
            build_engine,
            engine_key,
            import_tensorrt,
            record_build,
        )
    except ImportError as exc:
        raise needs_extra(f"knnclip build ({exc})", "export") from None
    from pathlib import Path

    from knnclip.engine.artifact import read_manifest
    from knnclip.engine.backends.tensorrt.cache import EngineCache

    trt = import_tensorrt()
    onnx_dir = Path(args.onnx)
    manifest = read_manifest(onnx_dir)
    cache = EngineCache(args.cache)
    settings = BuildSettings(
        precision=args.precision,
        max_batch=args.max_batch,
        workspace_bytes=args.workspace_gib << 30,
        allow_tf32=args.allow_tf32,
        timing_cache=Path(args.timing_cache) if args.timing_cache else None,
        timing_cache_dir=cache.root / "timing",
    ).for_artifact(manifest)
    key = engine_key(manifest, settings, trt.__version__)
    plan = cache.get_or_build(key, lambda: build_engine(onnx_dir, settings), {"onnx_dir": str(onnx_dir)})
    record_build(cache.root, manifest, settings)  # the run time builds (and so finds) this same engine
    print(
        f"engine for {onnx_dir} on {key.gpu_name} (sm {key.compute_capability}, TensorRT {key.tensorrt_version}, "
        f"{settings.precision}): {len(plan) / 2**20:.1f} MiB in {cache.root}"
    )
    return 0


def _add_build_parser(commands: argparse._SubParsersAction) -> None:
    build = commands.add_parser(
        "build", help="build a TensorRT engine for this GPU from an exported ONNX artefact (needs TensorRT)"
    )
    build.add_argument("--onnx", required=True, help="an artefact directory written by knnclip export")
    build.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16"],
        help="engine precision (default: the artefact's own; TensorRT 11 builds only that)",
    )
    build.add_argument("--allow-tf32", action="store_true", help="let an fp32 engine use TF32 matrix products")
    build.add_argument("--max-batch", type=int, default=1, help="largest batch of the optimisation profile")
    build.add_argument("--workspace-gib", type=int, default=4, help="builder workspace limit in GiB (default 4)")
    build.add_argument("--timing-cache", help="a timing cache file to read and update (default: beside the engines)")
    build.add_argument("--cache", help="engine cache directory (default ~/.cache/knnclip/engines)")
    build.set_defaults(run=_build)
