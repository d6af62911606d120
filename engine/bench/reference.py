"""The research-code way of running kNN-CLIP, timed per stage: torch eager models (FC-CLIP's own
forward, auxiliary predictions included), mask pooling with ``F.interpolate`` and einsum, an
exact fp32 ``faiss.IndexFlatIP``, retrieval probabilities and fusion in a Python loop, FC-CLIP's
torch semantic and panoptic inference. ``knnclip bench`` runs it beside the engine on the same
weights, images and database."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from knnclip.engine.bench.build import STAGES
from knnclip.engine.config import RetrievalConfig
from knnclip.engine.pipeline.preprocess import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:  # the torch side, imported when a pipeline is made
    from knnclip.export.dinov2 import DinoV2
    from knnclip.export.fcclip import FCCLIP


class ReferencePipeline:
    """The torch reference over the models in ``work/models`` and the database in ``work/db``."""

    def __init__(self, work: Path, device: str, retrieval: RetrievalConfig | None = None) -> None:
        import faiss
        import torch

        from knnclip.engine.artifact import FCCLIPTextManifest, read_manifest
        from knnclip.engine.backends import open_session
        from knnclip.engine.database import Database
        from knnclip.engine.text.textbank import TextBank
        from knnclip.engine.text.tokenizer import ByteTokenizer
        from knnclip.export.modules import build_module

        self.torch = torch
        self.dev = torch.device(device)
        models = work / "models"
        image_manifest = read_manifest(models / "fcclip" / "image", verify_files=False)
        image_graph = cast(Any, build_module(models / "fcclip" / "image", image_manifest))  # an ImageGraph
        self.fcclip: FCCLIP = image_graph.model.to(self.dev)
        dinov2_manifest = read_manifest(models / "dinov2", verify_files=False)
        self.dinov2: DinoV2 = cast("DinoV2", build_module(models / "dinov2", dinov2_manifest)).to(self.dev)
        self.cfg = self.fcclip.config.inference
        with Database.open(work / "db", read_only=True) as db:
            entry_ids, self.labels = db.ids_and_labels()  # index order: faiss position i is entry i here
            vectors = np.ascontiguousarray(db.vectors(entry_ids), np.float32)
            self.vocab = sorted(db.vocabulary.values(), key=lambda c: c.id)
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
        text_manifest = read_manifest(models / "fcclip" / "text", verify_files=False)
        assert isinstance(text_manifest, FCCLIPTextManifest)  # read_manifest's type for that kind
        text_session = open_session(models / "fcclip" / "text", "onnxruntime", "cpu")
        weights_sha256 = text_manifest.weights_sha256 or ""
        text = TextBank(
            text_session, ByteTokenizer(), list(text_manifest.templates), weights_sha256, cache_dir=work / "text-cache"
        )
        rows = text.rows([c.name for c in self.vocab])
        self.classifier = self.fcclip.classifier_with_void(torch.from_numpy(rows).to(self.dev))
        self.id_to_index = {c.id: i for i, c in enumerate(self.vocab)}
        self.retrieval = retrieval or RetrievalConfig()
        self.seen = torch.zeros(len(self.vocab), device=self.dev)
        self.fixed: tuple[int, int] | None = image_manifest.input_size  # None: each image its own size
        self.dino_size = self.dinov2.config.img_size

    # The models and the search, one method each so that a better torch pipeline can replace them.
    def run_fcclip(self, x: Any) -> dict[str, Any]:
        return self.fcclip.forward_image(x, self.classifier, [1] * len(self.vocab))

    def run_dinov2(self, d: Any) -> Any:
        return self.dinov2(d)

    def search(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(q, self.retrieval.k)

    def _sync(self) -> None:
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    def preprocess(self, pixels: np.ndarray) -> tuple[Any, Any, tuple[int, int]]:
        """FC-CLIP's input (the engine's sizes, torch arithmetic) and DINOv2's (torch bicubic)."""
        import torch.nn.functional as F
        from PIL import Image

        from knnclip.engine.pipeline.preprocess import fcclip_sizes

        torch, dev, cfg = self.torch, self.dev, self.cfg
        h, w = pixels.shape[:2]
        size, padded = fcclip_sizes((h, w), short=cfg.min_size_test, max_size=cfg.max_size_test, pad_to=self.fixed)
        resized = np.asarray(Image.fromarray(pixels).resize((size[1], size[0]), Image.Resampling.BILINEAR))
        mean = torch.tensor(cfg.pixel_mean, device=dev).view(3, 1, 1)
        std = torch.tensor(cfg.pixel_std, device=dev).view(3, 1, 1)
        x = (torch.from_numpy(resized).to(dev).permute(2, 0, 1).float() - mean) / std
        x = F.pad(x, (0, padded[1] - size[1], 0, padded[0] - size[0]))[None]
        d = torch.from_numpy(pixels).to(dev).permute(2, 0, 1)[None].float() / 255
        d = F.interpolate(d, size=(self.dino_size, self.dino_size), mode="bicubic", align_corners=False)
        d = (d - torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)) / torch.tensor(
            IMAGENET_STD, device=dev
        ).view(1, 3, 1, 1)
        return x, d, size

    def pool(self, masks: Any, keys: Any, size: tuple[int, int]) -> np.ndarray:
        """Mask average pooling of the DINOv2 keys under the binarised, resized query masks."""
        import torch.nn.functional as F

        from knnclip.engine.pipeline.stages import valid_mask_extent

        rows, cols = valid_mask_extent(size)
        valid = masks[:, :rows, :cols]
        m = F.interpolate(valid[None], size=keys.shape[-2:], mode="bilinear", align_corners=False)[0] > 0
        m = m.float() / (m.float().sum((1, 2), keepdim=True) + 1e-8)
        q = self.torch.einsum("qhw,chw->qc", m, keys[0])
        return F.normalize(q, dim=-1).cpu().numpy()

    def fuse(self, out: dict[str, Any], sims: np.ndarray, ids: np.ndarray) -> Any:
        """Retrieval probabilities one query at a time, fused where the config says: into the
        out-of-vocabulary distribution before FC-CLIP's ensemble (kNN-CLIP), or after it."""
        from knnclip.export.fcclip import inference as fc

        torch, rc, cfg = self.torch, self.retrieval, self.cfg
        in_logits, ov_logits = out["pred_logits"][0], out["ov_logits"][0]
        p_ret = np.zeros((len(sims), len(self.vocab)))
        for qi in range(len(sims)):
            weights = np.exp((sims[qi] - sims[qi].max()) / rc.tau)
            weights /= weights.sum()
            for j, entry in enumerate(ids[qi]):
                if entry >= 0:
                    p_ret[qi, self.id_to_index[int(self.labels[entry])]] += weights[j]
        confident = p_ret.max(axis=1) >= rc.T
        if rc.fusion == "out_of_vocab":
            p_out = ov_logits[..., :-1].softmax(-1).cpu().numpy()
            p_out[confident] = rc.lam * p_ret[confident] + (1 - rc.lam) * p_out[confident]
            # the ensemble takes logits: log p_out' (with a void column it ignores) is p_out' again
            fused_ov = torch.log(torch.from_numpy(p_out).float().to(self.dev))
            fused_ov = torch.cat([fused_ov, ov_logits[..., -1:]], dim=-1)
            return fc.ensemble(in_logits, fused_ov, self.seen, cfg.alpha, cfg.beta)
        probs = fc.ensemble(in_logits, ov_logits, self.seen, cfg.alpha, cfg.beta).softmax(-1).cpu().numpy()
        for row in np.flatnonzero(confident):
            probs[row, :-1] = rc.lam * p_ret[row] * (1 - probs[row, -1]) + (1 - rc.lam) * probs[row, :-1]
        return torch.log(torch.from_numpy(probs).to(self.dev) + 1e-8)

    def postprocess(self, mask_cls: Any, masks: Any, size: tuple[int, int], original: tuple[int, int]) -> None:
        from knnclip.export.fcclip import inference as fc

        padded = (int(masks.shape[-2]) * 4, int(masks.shape[-1]) * 4)  # the masks are at stride 4 of the input
        full = fc.resize_masks(masks, padded, size, original)
        semantic = fc.semantic_inference(mask_cls, full).argmax(0)
        thresholds = self.cfg.object_mask_threshold, self.cfg.overlap_threshold
        fc.panoptic_inference(mask_cls, full, [False] * len(self.vocab), *thresholds)
        semantic.cpu()

    def segment(self, image: np.ndarray) -> dict[str, float]:
        """One image through every stage; milliseconds per stage (``STAGES``)."""
        from knnclip.engine.pipeline.preprocess import load_image

        marks = [time.perf_counter()]

        def mark() -> None:
            self._sync()
            marks.append(time.perf_counter())

        pixels = load_image(image)
        mark()
        x, d, size = self.preprocess(pixels)
        mark()
        with self.torch.inference_mode():
            out = self.run_fcclip(x)
            mark()
            keys = self.run_dinov2(d)
            mark()
            masks = out["pred_masks"][0]
            q = self.pool(masks, keys, size)
            mark()
            sims, ids = self.search(q)
            mark()
            mask_cls = self.fuse(out, sims, ids)
            mark()
            self.postprocess(mask_cls, masks, size, pixels.shape[:2])
            mark()
        timed = STAGES[:-1]
        ms = {s: (marks[i + 1] - marks[i]) * 1e3 for i, s in enumerate(timed)}
        ms["total"] = (marks[-1] - marks[0]) * 1e3
        return ms


class BestTorchPipeline(ReferencePipeline):
    """The fastest torch a user could write without the engine: FC-CLIP's deformable attention
    through ``grid_sample``, both models under ``torch.autocast`` bf16 (CPU) or fp16 (CUDA), DINOv2
    through ``torch.compile`` where it compiles, and the search as a bf16 matrix product plus
    ``torch.topk``; the rest as the reference does it. On a CPU without bfloat16 arithmetic, bf16
    is emulated and slower than fp32, so there the models and the search stay in fp32
    (``precision_reason`` says which was chosen and why)."""

    def __init__(self, work: Path, device: str, retrieval: RetrievalConfig | None = None) -> None:
        super().__init__(work, device, retrieval)
        from knnclip.export.fcclip.deform_attn import set_sampling

        torch = self.torch
        set_sampling(self.fcclip, "grid")
        self.half, self.precision_reason = fastest_precision(torch, self.dev)
        self.compiled = "eager"
        compiled = torch.compile(self.dinov2)
        try:  # torch.compile compiles on the first call: make that call here, at the benchmark's size
            size = self.dino_size
            with torch.inference_mode(), self._autocast():
                compiled(torch.zeros(1, 3, size, size, device=self.dev))
            self.dinov2, self.compiled = compiled, "torch.compile"
        except Exception:  # noqa: BLE001 - a platform or model it cannot compile: eager it is, and the report says so
            pass
        vectors = self.index.reconstruct_n(0, self.index.ntotal)
        self.vectors = torch.from_numpy(vectors).to(self.dev, self.half)

    def _autocast(self) -> Any:
        if self.half == self.torch.float32:
            return contextlib.nullcontext()
        return self.torch.autocast(self.dev.type, dtype=self.half)

    def run_fcclip(self, x: Any) -> dict[str, Any]:
        with self._autocast():
            out = super().run_fcclip(x)
        return {k: v.float() if hasattr(v, "float") else v for k, v in out.items()}

    def run_dinov2(self, d: Any) -> Any:
        with self._autocast():
            return super().run_dinov2(d).float()

    def search(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        scores = torch.from_numpy(q).to(self.dev, self.half) @ self.vectors.T
        values, index = torch.topk(scores.float(), min(self.retrieval.k, len(self.vectors)), dim=1)
        return values.cpu().numpy(), index.cpu().numpy()


def fastest_precision(torch: Any, device: Any) -> tuple[Any, str]:
    """The precision the best torch pipeline runs in on ``device``, and why: fp16 on a GPU, bf16
    on a CPU with bfloat16 arithmetic, fp32 on one without (emulated bf16 is slower)."""
    if device.type != "cpu":
        return torch.float16, "fp16 autocast on the GPU"
    from knnclip.engine.cpu_features import bf16_missing

    missing = bf16_missing()
    if missing is not None:
        return torch.float32, f"fp32: {missing}"
    return torch.bfloat16, "bf16 autocast: the CPU has bfloat16 arithmetic"
