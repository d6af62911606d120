"""``knnclip export``: build deployable artefacts (ONNX) from model checkpoints.

The argument parser lives here, without torch; the work is done by ``knnclip.export.cli``,
imported only when the command runs (it needs the ``[export]`` extra: torch, onnx).
"""

from __future__ import annotations

import argparse

from knnclip.engine.errors import BackendUnavailableError


def _run(args: argparse.Namespace) -> int:
    try:
        from knnclip.export import cli
    except ImportError as exc:
        raise BackendUnavailableError(
            f"knnclip export needs torch and onnx ({exc}); install them: pip install torch onnx "
            "(the CPU build of torch on machines without a GPU)"
        ) from None
    return cli.run(args)


def add_parser(commands: argparse._SubParsersAction) -> None:
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
    dino.add_argument("--opset", type=int, default=17, help="ONNX opset, 17 or newer (default 17)")
    dino.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    dino.add_argument("--json", action="store_true", help="print the manifest as JSON")
    dino.set_defaults(run=_run)
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
    fc.add_argument("--size", default="800x1088", help="fixed input size HxW, multiples of 32 (default 800x1088)")
    fc.add_argument(
        "--seen-names",
        help="text file of FC-CLIP's training class names (one class per line, synonyms comma-separated); "
        "classes named there get the ensemble's alpha, others beta",
    )
    fc.add_argument("--out", required=True, help="directory to create (OUT/image, OUT/text)")
    fc.add_argument("--opset", type=int, default=17, help="ONNX opset, 17 or newer (default 17)")
    fc.add_argument("--overwrite", action="store_true", help="replace OUT/image and OUT/text if they exist")
    fc.add_argument("--json", action="store_true", help="print the manifests as JSON")
    fc.set_defaults(run=_run)
