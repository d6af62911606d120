"""OpenVINO sessions on the CPU: the ONNX artefact read directly, compiled for this CPU.

Two backends: ``"openvino"`` computes in fp32 (exact enough for parity with ONNX Runtime) and
``"openvino-bf16"`` in bfloat16 where the CPU has it (AVX-512 BF16, AMX). OpenVINO's own default
on such CPUs is bf16, silently; here the precision is always asked for explicitly
(``INFERENCE_PRECISION_HINT``) and shows in the session's ``repr``. Compiled models are cached on
disk (``CACHE_DIR``, beside the TensorRT engines), so a second open skips the compilation.
``KNNCLIP_OPENVINO_HINT=throughput`` tunes for many requests at once instead of one at a time.

Thread safety: one compiled model per session, one infer request per thread.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from knnclip.engine.artifact import FCCLIPImageManifest, Manifest, artifact_digest
from knnclip.engine.backends.base import Session
from knnclip.engine.errors import BackendUnavailableError, InvalidInputError, needs_extra

log = logging.getLogger("knnclip.backends")
PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
HINTS = {"latency": "LATENCY", "throughput": "THROUGHPUT"}


def cache_dir() -> Path:
    from knnclip.engine.cache import engine_cache_root

    return engine_cache_root() / "openvino"


class OpenVinoSession(Session):
    backend = "openvino"

    def __init__(
        self,
        directory: Path,
        manifest: Manifest,
        device: str = "cpu",
        *,
        precision: str = "fp32",
        hint: str | None = None,
        threads: int | None = None,
    ) -> None:
        super().__init__(directory, manifest, device)
        if device != "cpu":
            raise BackendUnavailableError("the OpenVINO backend runs on the CPU; use device='cpu'")
        if precision not in PRECISIONS:
            raise InvalidInputError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if precision == "bf16" and isinstance(manifest, FCCLIPImageManifest) and manifest.sampling != "grid":
            # Checked here: OpenVINO would fail in the first call instead ("GatherElements ... index < axisDimSize").
            raise BackendUnavailableError(
                f"{directory}: OpenVINO's bf16 cannot run FC-CLIP's gather-sampling graph (its bf16 index arithmetic "
                "goes out of range); export it with knnclip export fcclip --sampling grid, or use 'openvino' (fp32)"
            )
        hint = (hint or os.environ.get("KNNCLIP_OPENVINO_HINT") or "latency").lower()
        if hint not in HINTS:
            raise InvalidInputError(f"the OpenVINO hint must be one of {sorted(HINTS)}, got {hint!r}")
        try:
            import openvino as ov
        except ImportError:
            raise needs_extra("the OpenVINO backend", "openvino") from None
        core = ov.Core()
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise BackendUnavailableError("this CPU has no bfloat16 arithmetic (AVX-512 BF16 or AMX); use 'openvino'")
        # One folder per artefact (its files' digest): OpenVINO's own key can miss a change of
        # weights, and the blob of a twin graph with other weights would then run silently.
        cache = cache_dir() / artifact_digest(manifest)[:32]
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a read-only home: compile every time rather than not at all
            log.warning("%s: no OpenVINO model cache (%s); each open compiles the model again", cache, exc)
        else:
            core.set_property({"CACHE_DIR": str(cache)})
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": HINTS[hint]}
        if threads is None:
            threads = int(os.environ.get("KNNCLIP_OV_THREADS", "0"))
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        model = core.read_model(str(directory / manifest.files["model"].name))
        self._compiled = core.compile_model(model, "CPU", config)
        self.precision, self.hint = precision, hint
        self._outputs = {spec.name: self._port(spec.name) for spec in self.outputs}
        self._local = threading.local()

    def _port(self, name: str) -> Any:
        for port in self._compiled.outputs:
            if name in port.get_names():
                return port
        raise BackendUnavailableError(f"{self}: OpenVINO's compiled model has no output {name!r}")

    def _run(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        results = request.infer({name: np.ascontiguousarray(value) for name, value in feed.items()})
        # Copies: the request reuses its output tensors on the next call.
        return {name: np.array(results[port], copy=True) for name, port in self._outputs.items()}

    def close(self) -> None:
        self._compiled = None
        self._local = threading.local()

    def __repr__(self) -> str:
        return (
            f"OpenVinoSession({self.kind}, {getattr(self, 'precision', '?')}, {getattr(self, 'hint', '?')}, "
            f"{self.directory})"
        )
