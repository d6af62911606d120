"""The DINOv2 keys model's ONNX export: traced at one input size (the position embedding resized
for it and folded in), the batch axis dynamic, verified in ONNX Runtime against torch, then
published with its manifest (:func:`knnclip.export.onnx.export_graph`)."""

from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np
import torch

from knnclip.engine.artifact import KIND_DINOV2
from knnclip.engine.errors import InvalidInputError
from knnclip.engine.pipeline.preprocess import IMAGENET_MEAN, IMAGENET_STD
from knnclip.export.dinov2.model import DinoV2
from knnclip.export.onnx import DEFAULT_OPSET, TOLERANCE, ExportResult, Graph, export_graph, parse_size

KIND_DINOV2_KEYS = KIND_DINOV2  # the run time reads the kinds it knows from knnclip.engine.artifact


def export_dinov2_onnx(
    model: DinoV2,
    out_dir: str | os.PathLike[str],
    *,
    size: int | str | tuple[int, int] = 518,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    torch_weights: bool = False,
) -> ExportResult:
    """Export ``model`` (its keys output) to ``out_dir`` and verify it in ONNX Runtime.

    Parameters
    ----------
    size
        Input size in pixels, a multiple of the patch size; the position embedding is resized
        for it once and folded into the graph as a constant. The batch axis stays dynamic.
    fp16
        Convolution and linear layers in fp16; LayerNorm, softmax, LayerScale and the residual
        stream in fp32. Input and output stay fp32.
    overwrite
        Replace an existing artefact directory (atomically: readers see the old one or the new one).
    extra
        More manifest fields (e.g. the checkpoint file's SHA-256).
    torch_weights
        Also save the weights for the torch backend (``weights.pt``).

    Raises
    ------
    ExportVerificationError
        When ONNX Runtime's output differs from the fp32 torch model by more than
        ``TOLERANCE[precision]`` relative L2 error; nothing is published then.
    """
    height, width = parse_size(size)
    precision = "fp16" if fp16 else "fp32"
    cfg = model.config
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise InvalidInputError("export takes the fp32 model (load_dinov2's); pass fp16=True for an fp16 graph")
    sample = torch.from_numpy(np.random.default_rng(0).standard_normal((1, cfg.in_chans, height, width), np.float32))
    saved = (model.fixed_pos_embed, model.fixed_size)
    model.eval().fix_input_size(height, width)
    try:
        # fp16 needs its own copy of the weights; fp32 traces the caller's model as is (no 2x memory).
        graph = Graph(
            module=model,
            inputs={"images": sample},
            outputs=("keys",),
            dynamic_axes={"images": {0: "batch"}, "keys": {0: "batch"}},
            export_module=copy.deepcopy(model).half_compute_() if fp16 else None,
        )
        manifest = {
            "kind": KIND_DINOV2_KEYS,
            "model": {"architecture": "dinov2", "config": cfg.to_json(), "name": cfg.describe()},
            "inputs": [
                {
                    "name": "images",
                    "shape": ["batch", cfg.in_chans, height, width],
                    "dtype": "float32",
                    "preprocessing": {"layout": "NCHW RGB in [0, 1], then", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
                }
            ],
            "outputs": [
                {
                    "name": "keys",
                    "shape": ["batch", cfg.embed_dim, height // cfg.patch_size, width // cfg.patch_size],
                    "dtype": "float32",
                }
            ],
            "input_size": [height, width],
            **(extra or {}),
        }
        return export_graph(
            graph,
            out_dir,
            manifest,
            precision=precision,
            tolerance=TOLERANCE[precision],
            opset=opset,
            overwrite=overwrite,
            torch_weights=torch_weights,
        )
    finally:
        model.fixed_pos_embed, model.fixed_size = saved
