"""Execution backends behind one :class:`Session` interface.

``open_session(artifact_dir, backend="auto", device="auto")`` reads and verifies the artefact's
manifest, then opens the fastest backend this machine has for it: TensorRT (an engine built for
this GPU), ONNX Runtime (CUDA or CPU providers), or torch (eager, the reference). On the CPU,
where OpenVINO is installed too, ``auto`` opens whichever of ONNX Runtime and OpenVINO (fp32)
measured faster for this artefact here (:mod:`~knnclip.engine.backends.choice`); bf16 only when
asked for by name. The session's ``repr``, ``selection`` and the log say which, and why.

>>> from knnclip.engine.backends import open_session          # doctest: +SKIP
>>> with open_session("models/dinov2") as session:            # doctest: +SKIP
...     keys = session.infer({"images": x})["keys"]
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from knnclip.engine.artifact import Manifest, read_manifest
from knnclip.engine.backends.base import Session, TensorSpec
from knnclip.engine.errors import BackendUnavailableError, KnnclipError

log = logging.getLogger("knnclip.backends")
BACKENDS = ("tensorrt", "onnxruntime", "torch", "openvino", "openvino-bf16")
AUTO_ORDER = ("tensorrt", "onnxruntime", "torch")  # OpenVINO where measured faster: backends/choice.py
__all__ = [
    "BACKENDS",
    "Session",
    "TensorSpec",
    "available_backends",
    "cuda_model_backends",
    "cuda_usable",
    "gpu_present",
    "open_session",
    "resolve_device",
]


def gpu_present() -> bool:
    """Whether a CUDA device is visible: the compiled ops see one, or the driver lists one."""
    from knnclip.engine import ops

    if ops.cuda_available():
        return True
    try:
        return any(Path("/proc/driver/nvidia/gpus").iterdir())
    except OSError:
        return False


def cuda_model_backends() -> list[str]:
    """The model backends that can run on a CUDA device here: none without a visible device;
    TensorRT with pycuda; ONNX Runtime with its CUDA provider (onnxruntime-gpu); torch built
    with CUDA. The compiled ops alone do not count: the models are the bulk of the work."""
    if not gpu_present():
        return []
    found = []
    if all(importlib.util.find_spec(m) is not None for m in ("tensorrt", "pycuda")):
        found.append("tensorrt")
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            found.append("onnxruntime")
    except ImportError:
        pass
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            found.append("torch")
    return found


def cuda_usable() -> bool:
    """True when a model backend can run on a CUDA device here (:func:`cuda_model_backends`)."""
    return bool(cuda_model_backends())


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` where a model backend can run there, else ``"cpu"`` (saying why
    when a GPU is present but unused); ``"cpu"`` and ``"cuda"`` as they are."""
    if device != "auto":
        return device
    if cuda_usable():
        return "cuda"
    if gpu_present():
        log.warning(
            "a CUDA device is present but no model backend can use it (install onnxruntime-gpu, TensorRT with "
            "pycuda, or torch with CUDA: docs/backends.md); running on the CPU"
        )
    return "cpu"


def available_backends() -> list[str]:
    """The backends whose libraries import here (not whether a device is present)."""
    found = []
    pairs = (("tensorrt", "tensorrt"), ("onnxruntime", "onnxruntime"), ("torch", "torch"), ("openvino", "openvino"))
    for backend, module in pairs:
        if importlib.util.find_spec(module) is not None:
            found.append(backend)
    return found


def open_session(
    artifact_dir: str | os.PathLike[str],
    backend: str = "auto",
    device: str = "auto",
    *,
    verify_files: bool = True,
) -> Session:
    """A session for the artefact in ``artifact_dir``.

    Parameters
    ----------
    backend
        ``"auto"`` (TensorRT, then ONNX Runtime, then torch: the first that can run here; on the
        CPU the faster of ONNX Runtime and OpenVINO fp32, measured once per artefact and machine),
        ``"tensorrt"``, ``"onnxruntime"``, ``"torch"``, ``"openvino"`` (CPU, fp32) or
        ``"openvino-bf16"`` (CPU, bfloat16).
    device
        ``"auto"`` (CUDA when usable, else CPU), ``"cuda"`` or ``"cpu"``.
    verify_files
        Re-hash the payload files against the manifest (seconds per GB; off for trusted caches).
    """
    directory = Path(artifact_dir)
    manifest = read_manifest(directory, verify_files=verify_files)
    device = resolve_device(device)
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "auto" and device == "cpu" and _measure_cpu_backends():
        from knnclip.engine.backends import choice
        from knnclip.engine.cache import engine_cache_root

        session = choice.open_fastest(
            directory, manifest, lambda name: _open(name, directory, manifest, device), engine_cache_root()
        )
        if session is not None:
            log.info("opened %r: %s", session, session.selection)
            return session
    order = [backend] if backend != "auto" else [b for b in AUTO_ORDER if not (b == "tensorrt" and device == "cpu")]
    reasons = []
    for name in order:
        try:
            session = _open(name, directory, manifest, device)
        except BackendUnavailableError as exc:
            if backend != "auto":
                raise
            reasons.append(f"{name}: {exc}")
            continue
        except KnnclipError as exc:
            if backend != "auto" or name != "tensorrt":
                raise  # the artefact or the input is at fault, not the backend
            # TensorRT's own failures (the parser, a build, a stale, foreign or undeserialisable
            # engine, a refused timing cache) are TensorRT's: the next backend can still run it.
            log.warning(
                "TensorRT could not run %s (%s: %s); trying the next backend", directory, type(exc).__name__, exc
            )
            reasons.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        except Exception as exc:  # a runtime that fails to create its session (a provider, a driver)
            if backend != "auto":
                raise
            log.warning(
                "%s could not open %s (%s: %s); trying the next backend", name, directory, type(exc).__name__, exc
            )
            reasons.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        log.info("opened %r", session)
        return session
    raise BackendUnavailableError(f"no backend can run {directory} on {device}: " + "; ".join(reasons))


def _measure_cpu_backends() -> bool:
    """Whether ``auto`` on the CPU has a choice to measure: ONNX Runtime and OpenVINO both here."""
    from knnclip.engine.backends.choice import measuring_enabled

    found = (importlib.util.find_spec(m) is not None for m in ("onnxruntime", "openvino"))
    return all(found) and measuring_enabled()


def _open(name: str, directory: Path, manifest: Manifest, device: str) -> Session:
    if name == "onnxruntime":
        from knnclip.engine.backends.onnxruntime import OrtSession

        return OrtSession(directory, manifest, device)
    if name == "torch":
        from knnclip.engine.backends.torch import TorchSession

        return TorchSession(directory, manifest, device)
    if name.startswith("openvino"):
        from knnclip.engine.backends.openvino import OpenVinoSession

        return OpenVinoSession(directory, manifest, device, precision="bf16" if name.endswith("bf16") else "fp32")
    from knnclip.engine.backends.tensorrt.session import open_tensorrt

    return open_tensorrt(directory, manifest, device)
