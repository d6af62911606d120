"""ONNX export of FC-CLIP as two artefacts that do not depend on the vocabulary:

- ``image/``: ``images [B, 3, H, W]`` (normalised, padded to the fixed export size) ->
  ``mask_logits [B, Q, H/4, W/4]``, ``class_embed [B, Q, E]`` (in-vocabulary branch),
  ``ov_embed [B, Q, E]`` (mask-pooled CLIP features projected into CLIP space). The dense CLIP
  map ``[B, C, H/32, W/32]`` is not an output: nothing at run time reads it, and the export check
  takes it from torch. Classification against text happens at run time, so a class
  added later needs no re-export. The manifest carries the two logit scales, the void
  embedding, the preprocessing and the inference settings.
- ``text/``: ``tokens [N, 77]`` int64 -> ``text_features [N, E]`` (not normalised).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from knnclip.engine.artifact import KIND_FCCLIP_IMAGE, KIND_FCCLIP_TEXT
from knnclip.engine.errors import InvalidInputError
from knnclip.engine.text.prompts import TEMPLATES
from knnclip.engine.text.tokenizer import find_bpe_file
from knnclip.export.fcclip.decoder import mask_pool
from knnclip.export.fcclip.deform_attn import SAMPLINGS, set_sampling
from knnclip.export.fcclip.model import FCCLIP, ClipModel
from knnclip.export.fcclip.vocabularies import COCO_PANOPTIC, coco_panoptic_seen_names
from knnclip.export.onnx import DEFAULT_OPSET, Comparison, ExportResult, Graph, export_graph, parse_size, rel_l2
from knnclip.export.precision import half_compute_copy

KIND_IMAGE = KIND_FCCLIP_IMAGE
KIND_TEXT = KIND_FCCLIP_TEXT
# FC-CLIP's decoder binarises masks (attention masks, mask pooling), so a last-bit difference can
# flip a pixel; the acceptance figure for ONNX Runtime parity is 1e-3.
TOLERANCE = 1e-3
# fp16: the continuous outputs to 2e-2.
TOLERANCE_FP16 = {"mask_logits": 2e-2, "class_embed": 2e-2, "ov_embed": 2e-2}
# ov_embed pools the CLIP map under masks binarised at logit > 0, so a logit within numerical
# noise of 0 can land on the other side in ONNX Runtime and move ov_embed in a step. It is checked
# against the pooling of the same binary masks (what the graph must compute), and each flipped
# pixel must be explained by noise: its torch logit within FLIP_NOISE times the typical (robust)
# logit difference of 0. A flip further out is a wrong graph ("mask_flips_beyond_noise" must be 0).
FLIP_NOISE = 8.0
# Where the FLOPs are: the ConvNeXt trunk and the pixel decoder. The transformer decoder's small
# MLPs make the mask logits and embeddings that get binarised and pooled; fp16 there flips mask
# pixels, and pooling over the coarse CLIP map magnifies each flip, for little speed.
FP16_PARTS = (
    "model.backbone.clip_model.visual.trunk.stem",
    "model.backbone.clip_model.visual.trunk.stages",
    "model.sem_seg_head.pixel_decoder",
)
IMAGE_OUTPUTS = ("mask_logits", "class_embed", "ov_embed")  # the run-time graph's
CHECK_OUTPUTS = (*IMAGE_OUTPUTS, "clip_dense")  # the torch reference of the export check


class ImageGraph(nn.Module):
    """The vocabulary-free image part of FC-CLIP as one traceable module: mask logits, class and
    CLIP embeddings (:data:`IMAGE_OUTPUTS`), and with ``dense`` the dense CLIP map too, which only
    the export check reads (:data:`CHECK_OUTPUTS`); the run-time graph leaves it out."""

    def __init__(self, model: FCCLIP, dense: bool = False) -> None:
        super().__init__()
        self.model = model
        self.dense = dense

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.model.image_embeddings(images)
        core = (out["pred_masks"], out["class_embed"], out["ov_embed"])
        return (*core, out["clip_vis_dense"]) if self.dense else core


class TextGraph(nn.Module):
    """CLIP's text tower: token ids -> text features."""

    def __init__(self, clip: ClipModel) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, tokens: Tensor) -> Tensor:
        return self.clip.encode_text(tokens)


@dataclass(frozen=True)
class FCCLIPExport:
    image: ExportResult
    text: ExportResult


def head_constants(model: FCCLIP) -> dict[str, Any]:
    """What run-time classification needs besides the graphs: both logit scales (before exp and
    the clamp at 100) and the normalised void embedding."""
    void = torch.nn.functional.normalize(model.void_embedding.weight.detach(), dim=-1)[0]
    return {
        "in_vocab_logit_scale": model.sem_seg_head.predictor.logit_scale.item(),
        "clip_logit_scale": model.clip.logit_scale.item(),
        "void_embedding": [float(v) for v in void],
    }


def image_axes(dynamic: bool) -> dict[str, dict[int, str]]:
    """The dynamic axes of the image graph: the batch, and with ``dynamic`` the spatial ones."""
    if not dynamic:
        return {name: {0: "batch"} for name in ("images", *IMAGE_OUTPUTS)}
    return {
        "images": {0: "batch", 2: "height", 3: "width"},
        "mask_logits": {0: "batch", 2: "height/4", 3: "width/4"},
        "class_embed": {0: "batch"},
        "ov_embed": {0: "batch"},
    }


def cfg_min_size(model: FCCLIP) -> int:
    return int(model.config.inference.min_size_test)


def input_range(model: FCCLIP) -> dict[str, Any]:
    """The input sizes a dynamic image graph takes: FC-CLIP's test sizes, padded to 32."""
    longest = -(-int(model.config.inference.max_size_test) // 32) * 32
    return {"min": [32, 32], "max": [longest, longest], "divisibility": 32}


def image_comparison(model: FCCLIP) -> Comparison:
    """The export check of the image graph (see ``FLIP_NOISE``): continuous outputs element by
    element; ``ov_embed`` against torch's pooling (of torch's dense CLIP map) and projection under
    ONNX Runtime's own binary masks; flipped mask pixels counted, and those not explained by
    numerical noise refused. The torch reference has the dense map as a fourth output."""

    def compare(actual: Sequence[np.ndarray], reference: Sequence[torch.Tensor]) -> tuple[dict, dict]:
        ort = dict(zip(IMAGE_OUTPUTS, actual, strict=True))
        ref = {name: r.detach() for name, r in zip(CHECK_OUTPUTS, reference, strict=True)}
        errors = {name: rel_l2(ort[name], ref[name].numpy()) for name in ("mask_logits", "class_embed")}
        dense = ref["clip_dense"].float()
        size = dense.shape[-2:]
        with torch.no_grad():
            at_ort = F.interpolate(torch.from_numpy(ort["mask_logits"]).double(), size=size, mode="bilinear")
            at_ref = F.interpolate(ref["mask_logits"].double(), size=size, mode="bilinear")
            expected = model.clip.visual.project_pooled(mask_pool(dense, at_ort.float())).numpy()
        flips = (at_ort > 0) != (at_ref > 0)
        # the typical size of the numerical differences, robust to a few wrong pixels (1.4826 MAD)
        noise = 1.4826 * float(torch.median((at_ort - at_ref).abs()))
        beyond = flips & (at_ref.abs() > FLIP_NOISE * noise + 1e-12)
        errors["ov_embed"] = rel_l2(ort["ov_embed"], expected)
        errors["mask_flips_beyond_noise"] = float(beyond.sum())
        details = {
            "ov_embed_mask_flips": int(flips.sum()),
            "ov_embed_rel_l2_vs_torch_masks": rel_l2(ort["ov_embed"], ref["ov_embed"].numpy()),
            "ov_embed_check": "against torch's pooling of ONNX Runtime's binary masks; flips within noise allowed",
        }
        return errors, details

    return compare


def export_fcclip_onnx(
    model: FCCLIP,
    out_dir: str | os.PathLike[str],
    *,
    size: int | str | tuple[int, int] | None = (800, 1088),
    seen_names: list[str] | None = None,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    torch_weights: bool = False,
    tokenizer: str = "clip-bpe",
    fp16: bool = False,
    sampling: str = "gather",
) -> FCCLIPExport:
    """Export ``model`` to ``out_dir/image`` and ``out_dir/text``, each verified in ONNX Runtime.

    Parameters
    ----------
    size
        The fixed input size (H, W), multiples of 32 (images are resized to fit and padded to it),
        or ``None`` for a graph with dynamic spatial axes: each image then runs at FC-CLIP's own
        test size (short side ``min_size_test``, long side at most ``max_size_test``, padded to 32).
        A dynamic graph is checked against torch at its traced size and at the transposed one.
    seen_names
        The class names (all synonyms) of FC-CLIP's training vocabulary: a class whose name is
        among them gets the geometric ensemble's ``alpha``, others ``beta``. Stored in the manifest
        with where it came from. ``None``: COCO panoptic's 133 classes, what the official
        checkpoints are trained on (``knnclip.export.fcclip.vocabularies``).
    sampling
        The deformable attention's bilinear sampling: ``"gather"`` (every runtime, TensorRT's
        choice) or ``"grid"`` (ONNX ``GridSample``: faster on ONNX Runtime and OpenVINO CPUs, and
        what OpenVINO's bf16 needs). Recorded in the image manifest.
    """
    if sampling not in SAMPLINGS:
        raise InvalidInputError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    previous = set_sampling(model, sampling)
    try:
        return _export_fcclip(
            model, out_dir, size, seen_names, opset, overwrite, extra, torch_weights, tokenizer, fp16, sampling
        )
    finally:
        set_sampling(model, previous)


def _export_fcclip(
    model: FCCLIP,
    out_dir: str | os.PathLike[str],
    size: int | str | tuple[int, int] | None,
    seen_names: list[str] | None,
    opset: int,
    overwrite: bool,
    extra: dict[str, Any] | None,
    torch_weights: bool,
    tokenizer: str,
    fp16: bool,
    sampling: str,
) -> FCCLIPExport:
    dynamic = size is None
    if dynamic:  # traced at FC-CLIP's test size of a 4:3 landscape image, checked at its portrait too
        short = -(-cfg_min_size(model) // 32) * 32
        height, width = short, -(-round(short * 4 / 3) // 32) * 32
    else:
        assert size is not None
        height, width = parse_size(size)
    cfg = model.config
    if tokenizer not in ("clip-bpe", "bytes"):
        raise InvalidInputError(f"tokenizer must be 'clip-bpe' or 'bytes', got {tokenizer!r}")
    if height % 32 or width % 32:
        raise InvalidInputError(f"FC-CLIP's input size must be a multiple of 32, got {height}x{width}")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise InvalidInputError("export takes the fp32 model (load_fcclip's)")
    out = Path(out_dir)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.standard_normal((1, 3, height, width), dtype=np.float32))
    q, e = cfg.decoder.num_queries, cfg.clip.embed_dim
    common = {
        "model": {"architecture": "fcclip", "config": cfg.to_json()},
        **(extra or {}),
    }

    def spatial(stride: int) -> list[int | str]:
        if dynamic:
            return ["height", "width"] if stride == 1 else [f"height/{stride}", f"width/{stride}"]
        return [height // stride, width // stride]

    image = export_graph(
        Graph(
            module=ImageGraph(model, dense=True).eval(),  # the reference, with the dense map the check needs
            inputs={"images": images},
            outputs=IMAGE_OUTPUTS,
            dynamic_axes=image_axes(dynamic),
            export_module=(
                half_compute_copy(ImageGraph(model).eval(), FP16_PARTS) if fp16 else ImageGraph(model).eval()
            ),
        ),
        out / "image",
        {
            **common,
            "kind": KIND_IMAGE,
            "inputs": [{"name": "images", "shape": ["batch", 3, *spatial(1)], "dtype": "float32"}],
            "outputs": [
                {"name": "mask_logits", "shape": ["batch", q, *spatial(4)], "dtype": "float32"},
                {"name": "class_embed", "shape": ["batch", q, e], "dtype": "float32"},
                {"name": "ov_embed", "shape": ["batch", q, e], "dtype": "float32"},
            ],
            "input_size": None if dynamic else [height, width],
            **({"input_range": {**input_range(model), "opt": [height, width]}} if dynamic else {}),
            "preprocessing": {
                "layout": "NCHW RGB in 0..255, resized (short side, bilinear), then",
                "mean": list(cfg.inference.pixel_mean),
                "std": list(cfg.inference.pixel_std),
                "min_size_test": cfg.inference.min_size_test,
                "max_size_test": cfg.inference.max_size_test,
                "padding": "zeros at the bottom and right, after normalisation",
            },
            "head": head_constants(model),
            "inference": {
                "alpha": cfg.inference.alpha,
                "beta": cfg.inference.beta,
                "object_mask_threshold": cfg.inference.object_mask_threshold,
                "overlap_threshold": cfg.inference.overlap_threshold,
            },
            "seen_names": sorted(set(coco_panoptic_seen_names() if seen_names is None else seen_names)),
            "seen_vocabulary": COCO_PANOPTIC if seen_names is None else "given",
            "sampling": sampling,
        },
        precision="fp16" if fp16 else "fp32",
        tolerance={
            **(TOLERANCE_FP16 if fp16 else dict.fromkeys(IMAGE_OUTPUTS, TOLERANCE)),
            "mask_flips_beyond_noise": 0,
        },
        compare=image_comparison(model),
        opset=opset,
        overwrite=overwrite,
        torch_weights=torch_weights,
        # a dynamic graph must also be right at a size it was not traced at
        extra_feeds=[{"images": images.transpose(2, 3).contiguous()}] if dynamic else (),
    )
    tokens = torch.from_numpy(rng.integers(1, cfg.clip.vocab_size - 2, (3, cfg.clip.context_length)))
    tokens[:, 0] = cfg.clip.vocab_size - 2  # start of text
    tokens[np.arange(3), [5, 9, cfg.clip.context_length - 1]] = cfg.clip.vocab_size - 1  # end of text: the max id
    # The text artefact carries CLIP's BPE merges itself, so a machine that only runs models needs
    # nothing else (no open_clip_torch).
    bpe = find_bpe_file() if tokenizer == "clip-bpe" else None
    text = export_graph(
        Graph(
            module=TextGraph(model.clip).eval(),
            inputs={"tokens": tokens},
            outputs=("text_features",),
            dynamic_axes={"tokens": {0: "texts"}, "text_features": {0: "texts"}},
        ),
        out / "text",
        {
            **common,
            "kind": KIND_TEXT,
            "inputs": [{"name": "tokens", "shape": ["texts", cfg.clip.context_length], "dtype": "int64"}],
            "outputs": [{"name": "text_features", "shape": ["texts", e], "dtype": "float32"}],
            "tokenizer": {
                "kind": tokenizer,
                "context_length": cfg.clip.context_length,
                "vocab_size": cfg.clip.vocab_size,
                **({"file": bpe.name} if bpe is not None else {}),
            },
            "templates": list(TEMPLATES),
        },
        precision="fp32",
        tolerance=1e-4,
        opset=opset,
        overwrite=overwrite,
        torch_weights=torch_weights,
        extra_files={"bpe_vocab": bpe} if bpe is not None else None,
    )
    return FCCLIPExport(image, text)
