"""ONNX artefact -> TensorRT engine (TensorRT 10 and 11 Python API).

Precision: on TensorRT 10, fp16/bf16 are builder flags over a weakly typed network; TensorRT 11
builds strongly typed networks only, so there the precision is the ONNX graph's own (export an
fp16 graph, which keeps LayerNorm and softmax in fp32) and the flags are not set. Optimisation
profiles cover the dynamic axes (batch); a timing cache speeds up rebuilds.

Nothing here has run on a GPU yet: TensorRT cannot be installed on the machines this was written
on. The code follows the documented API; ``benchmarks/gpu_check.py`` is where it gets exercised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knnclip.engine.artifact import read_manifest
from knnclip.engine.backends.tensorrt.cache import EngineKey
from knnclip.engine.errors import BackendUnavailableError, InvalidInputError, KnnclipError

PRECISIONS = ("fp32", "fp16", "bf16")


class EngineBuildError(KnnclipError):
    """TensorRT could not parse the graph or build an engine (the message carries its errors)."""


@dataclass(frozen=True)
class BuildSettings:
    precision: str = "fp16"
    max_batch: int = 1
    workspace_bytes: int = 4 << 30
    timing_cache: Path | None = None
    extra_profiles: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InvalidInputError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.max_batch < 1:
            raise InvalidInputError(f"max_batch must be at least 1, got {self.max_batch}")


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(
            f"TensorRT is not installed ({exc}): pip install tensorrt (needs an NVIDIA GPU and driver)"
        ) from None
    return trt


def profiles_for(manifest: dict[str, Any], settings: BuildSettings) -> list[tuple[str, tuple, tuple, tuple]]:
    """(name, min, opt, max) per input: the batch axis runs 1..max_batch; ``height``/``width`` axes
    (an image graph with dynamic spatial axes) cover the manifest's ``input_range``, tuned for its
    ``opt`` size; fixed axes are as they are."""
    spatial = manifest.get("input_range") or {}
    axis = {"height": 0, "width": 1}
    out = []
    for spec in manifest["inputs"]:
        name = spec["name"]
        if name in settings.extra_profiles:
            lo, opt, hi = settings.extra_profiles[name]
            out.append((name, tuple(lo), tuple(opt), tuple(hi)))
            continue

        def bound(d: int | str, which: str) -> int:
            if not isinstance(d, str):
                return int(d)
            if d in axis and spatial:
                return int(spatial[which][axis[d]])
            return {"min": 1, "opt": settings.max_batch, "max": settings.max_batch}[which]

        lo, opt, hi = (tuple(bound(d, which) for d in spec["shape"]) for which in ("min", "opt", "max"))
        out.append((name, lo, opt, hi))
    return out


def gpu_identity() -> tuple[str, str]:
    """(name, compute capability) of CUDA device 0, through pycuda."""
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise BackendUnavailableError(f"the TensorRT backend needs pycuda ({exc}): pip install pycuda") from None
    cuda.init()
    device = cuda.Device(0)
    major, minor = device.compute_capability()
    return device.name(), f"{major}.{minor}"


def engine_key(manifest: dict[str, Any], settings: BuildSettings, trt_version: str) -> EngineKey:
    """What an engine built from the artefact ``manifest`` with ``settings`` on this GPU is valid for."""
    name, capability = gpu_identity()
    profiles = tuple((n, tuple(a), tuple(b), tuple(c)) for n, a, b, c in profiles_for(manifest, settings))
    onnx_sha = manifest["files"]["model"]["sha256"]
    return EngineKey(onnx_sha, trt_version, name, capability, settings.precision, profiles)


def build_engine(onnx_dir: str | Path, settings: BuildSettings) -> bytes:
    """Build a serialized engine (plan) from the ONNX artefact in ``onnx_dir``."""
    trt = import_tensorrt()
    onnx_dir = Path(onnx_dir)
    manifest = read_manifest(onnx_dir)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0
    if major >= 11 or settings.precision == "fp32" and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        # TensorRT 11 knows only strongly typed networks; on 10, fp32 asks for exactly the graph's types.
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_dir / manifest["files"]["model"]["name"])):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{onnx_dir}: TensorRT could not parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    if major < 11 and settings.precision in ("fp16", "bf16"):
        config.set_flag(trt.BuilderFlag.FP16 if settings.precision == "fp16" else trt.BuilderFlag.BF16)
    elif major >= 11 and settings.precision != manifest.get("precision", "fp32"):
        raise EngineBuildError(
            f"TensorRT {trt.__version__} builds the graph's own precision ({manifest.get('precision')}); "
            f"export an {settings.precision} ONNX graph for an {settings.precision} engine"
        )
    profile = builder.create_optimization_profile()
    for name, lo, opt, hi in profiles_for(manifest, settings):
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    timing = settings.timing_cache
    cache_bytes = timing.read_bytes() if timing is not None and timing.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"{onnx_dir}: TensorRT returned no engine (see its log above for the reason)")
    if settings.timing_cache is not None:
        from knnclip.engine.fsutil import atomic_write_bytes

        atomic_write_bytes(settings.timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)
