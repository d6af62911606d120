"""The exported models a segmenter runs, found in one directory and opened as sessions.

Layout (what ``knnclip export`` writes)::

    MODELS/fcclip/image/   FC-CLIP image part (fcclip-image artefact)
    MODELS/fcclip/text/    CLIP text tower (fcclip-text artefact)
    MODELS/dinov2/         DINOv2 keys model (dinov2-keys artefact)
    MODELS/bpe_simple_vocab_16e6.txt.gz   optional: CLIP's BPE merges (else open_clip_torch's)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from knnclip.engine.artifact import DINOv2Manifest, FCCLIPImageManifest, FCCLIPTextManifest
from knnclip.engine.backends import Session, open_session, resolve_device
from knnclip.engine.errors import ArtifactCorruptError, BackendUnavailableError, ModelFileError
from knnclip.engine.pipeline.arrays import HOST, ArrayModule, TorchArrays
from knnclip.engine.text.tokenizer import make_tokenizer

log = logging.getLogger("knnclip.pipeline")


@dataclass(frozen=True)
class FCCLIPHead:
    """What classification needs besides the image graph's outputs (from its manifest)."""

    in_vocab_logit_scale: float
    clip_logit_scale: float
    void_embedding: np.ndarray  # [E], normalised
    alpha: float
    beta: float
    object_mask_threshold: float
    overlap_threshold: float
    seen_names: frozenset[str]
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    min_size: int
    max_size: int


def _three(values: tuple[float, ...]) -> tuple[float, float, float]:
    """A per-channel (RGB) constant; the manifest reader checked there are three."""
    r, g, b = values
    return r, g, b


class ModelSet:
    """The three sessions (FC-CLIP image, CLIP text, DINOv2 keys), the tokenizer and FC-CLIP's
    head constants, opened from ``models_dir``."""

    def __init__(self, models_dir: str | os.PathLike[str], backend: str = "auto", device: str = "auto") -> None:
        root = Path(models_dir)
        missing = [sub for sub in ("fcclip/image", "fcclip/text", "dinov2") if not (root / sub).is_dir()]
        if missing:
            raise ModelFileError(
                f"{root}: not a models directory (no {', '.join(missing)}); export the models there with "
                "knnclip export fcclip / dinov2, or run knnclip demo, which writes knnclip-demo/models"
            )
        self.root = root
        device = resolve_device(device)  # once, so the three models agree (and the reason is said once)
        self.device = device
        self.fcclip: Session = open_session(root / "fcclip" / "image", backend, device)
        self.text: Session = open_session(root / "fcclip" / "text", backend, device)
        self.dinov2: Session = open_session(root / "dinov2", backend, device)
        for session, kind in ((self.fcclip, "fcclip-image"), (self.text, "fcclip-text"), (self.dinov2, "dinov2-keys")):
            if session.kind != kind:
                raise ArtifactCorruptError(session.directory, f"expected a {kind} artefact here, found {session.kind}")
        # the BPE merges the text artefact carries, else a copy in the models directory
        m, text, dinov2 = self.fcclip.manifest, self.text.manifest, self.dinov2.manifest
        # the session kinds are checked above, and read_manifest types a manifest by its kind
        assert isinstance(m, FCCLIPImageManifest) and isinstance(text, FCCLIPTextManifest)
        assert isinstance(dinov2, DINOv2Manifest) and dinov2.input_size is not None
        # the BPE merges the text artefact carries, else a copy in the models directory
        self.tokenizer = make_tokenizer(text.tokenizer, [self.text.directory, root])
        self.head = FCCLIPHead(
            in_vocab_logit_scale=m.in_vocab_logit_scale,
            clip_logit_scale=m.clip_logit_scale,
            void_embedding=np.asarray(m.void_embedding, np.float32),
            alpha=m.alpha,
            beta=m.beta,
            object_mask_threshold=m.object_mask_threshold,
            overlap_threshold=m.overlap_threshold,
            seen_names=m.seen_names,
            pixel_mean=_three(m.pixel_mean),
            pixel_std=_three(m.pixel_std),
            min_size=m.min_size,
            max_size=m.max_size,
        )
        # None: a graph with dynamic spatial axes, fed each image at FC-CLIP's own test size
        self.fcclip_size: tuple[int, int] | None = m.input_size
        self.dinov2_size: tuple[int, int] = dinov2.input_size
        self.dinov2_mean, self.dinov2_std = _three(dinov2.mean), _three(dinov2.std)
        self.embedding_dim = int(self.dinov2.outputs[0].shape[1])
        self.text_weights_sha256 = text.weights_sha256 or ""
        self.templates: list[str] = list(text.templates)
        self.context_length = text.context_length

    def sessions(self) -> tuple[Session, Session, Session]:
        return self.fcclip, self.text, self.dinov2

    def array_module(self) -> ArrayModule:
        """Where the pipeline keeps its arrays with these models: on their CUDA device when the
        image models hand their outputs over there (``Session.infer_device``) and torch can hold
        them; otherwise on the host, with the reason logged."""
        if not self.device.startswith("cuda"):
            return HOST
        without = [repr(s) for s in (self.fcclip, self.dinov2) if not s.device_outputs]
        if without:
            log.warning("post-processing on the host: %s hand no outputs over on the device", ", ".join(without))
            return HOST
        try:
            return TorchArrays(self.device)
        except ImportError:
            log.warning(
                "post-processing on the host: the device pipeline holds its arrays in torch, which is "
                "not installed (install a CUDA build of torch)"
            )
        except BackendUnavailableError as exc:
            log.warning("post-processing on the host: %s", exc)
        return HOST

    @property
    def backends(self) -> dict[str, str]:
        return {name: repr(s) for name, s in (("fcclip", self.fcclip), ("text", self.text), ("dinov2", self.dinov2))}

    def identity(self) -> dict[str, str]:
        """Which weights these are: the models directory and each artefact's weights SHA-256."""
        sessions = (("fcclip", self.fcclip), ("text", self.text), ("dinov2", self.dinov2))
        weights = {f"{n}_weights_sha256": str(s.manifest.weights_sha256) for n, s in sessions}
        return {"dir": str(self.root), **weights}

    def close(self) -> None:
        for session in (self.fcclip, self.text, self.dinov2):
            session.close()
