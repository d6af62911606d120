"""ONNX artefact -> TensorRT engine (TensorRT 10 and 11 Python API).

Precision: on TensorRT 10, fp16/bf16 are builder flags over a weakly typed network; TensorRT 11
builds strongly typed networks only, so there the precision is the ONNX graph's own (export an
fp16 graph, which keeps LayerNorm and softmax in fp32) and the flags are not set. An "fp32" engine
is fp32: TensorRT's default TF32 for matrix products is turned off unless ``allow_tf32``.
The precision defaults to the artefact's own. Optimisation profiles cover the dynamic axes
(batch, an image graph's height and width); a timing cache beside the engines speeds up rebuilds.

``knnclip build`` records the settings it built with (:func:`record_build`), and the run time
builds, or finds, the engine with those (:func:`settings_for`), so a prebuilt engine is the one
the run time uses. Engines are keyed by every file of the artefact (:func:`artifact_digest`):
graphs over 2 GiB keep their weights in ``model.onnx.data``, and new weights mean a new engine.

Nothing here has run on a GPU yet: TensorRT cannot be installed on the machines this was written
on. The code follows the documented API; ``benchmarks/gpu_check.py`` is where it gets exercised.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from knnclip.engine.artifact import TEXT_BATCH, Manifest, artifact_digest, read_manifest
from knnclip.engine.backends.tensorrt.cache import EngineKey
from knnclip.engine.errors import InvalidInputError, KnnclipError, needs_extra
from knnclip.engine.fsutil import atomic_write_bytes, read_regular_file

log = logging.getLogger("knnclip.tensorrt")

PRECISIONS = ("fp32", "fp16", "bf16")


class EngineBuildError(KnnclipError):
    """TensorRT could not parse the graph or build an engine (the message carries its errors)."""


@dataclass(frozen=True)
class BuildSettings:
    """How an engine is built. ``precision=None`` is the artefact's own (:meth:`for_artifact`)."""

    precision: str | None = None
    max_batch: int = 1
    workspace_bytes: int = 4 << 30
    allow_tf32: bool = False
    timing_cache: Path | None = None  # a timing cache file named by the user, read and rewritten as it is
    # else a folder of timing caches, one per GPU model, compute capability and TensorRT version
    # (:func:`timing_cache_file`): TensorRT refuses another GPU's or version's cache
    timing_cache_dir: Path | None = None
    extra_profiles: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.precision is not None and self.precision not in PRECISIONS:
            raise InvalidInputError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.max_batch < 1:
            raise InvalidInputError(f"max_batch must be at least 1, got {self.max_batch}")

    def for_artifact(self, manifest: Manifest) -> BuildSettings:
        """These settings with the precision resolved against the artefact's."""
        return self if self.precision is not None else replace(self, precision=manifest.precision)


_RECORDED = ("precision", "max_batch", "workspace_bytes", "allow_tf32")


def _record_path(cache_root: Path, manifest: Manifest) -> Path:
    return Path(cache_root) / "builds" / f"{artifact_digest(manifest)[:32]}.json"


def record_build(cache_root: Path, manifest: Manifest, settings: BuildSettings) -> None:
    """Remember how ``knnclip build`` built this artefact's engine, for the run time to use."""
    record = {k: v for k, v in asdict(settings.for_artifact(manifest)).items() if k in _RECORDED}
    path = _record_path(cache_root, manifest)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(record, indent=1) + "\n").encode())


def settings_for(cache_root: Path, manifest: Manifest) -> BuildSettings:
    """The settings ``knnclip build`` recorded for this artefact, else its precision at batch 1;
    the timing caches beside the engines either way."""
    timing = Path(cache_root) / "timing"
    raw = read_regular_file(_record_path(cache_root, manifest), 1 << 16)
    if raw is not None:
        try:
            record = json.loads(raw)
            return BuildSettings(**{k: record[k] for k in _RECORDED}, timing_cache_dir=timing).for_artifact(manifest)
        except (ValueError, KeyError, TypeError, InvalidInputError) as exc:
            log.warning("ignoring the unreadable build record %s (%s)", _record_path(cache_root, manifest), exc)
    return BuildSettings(timing_cache_dir=timing).for_artifact(manifest)


def timing_cache_file(folder: Path, trt_version: str) -> Path:
    """The timing cache of this GPU model, compute capability and TensorRT version in ``folder``."""
    name, capability = gpu_identity()
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-").lower() or "gpu"
    return folder / f"{slug}-sm{capability}-trt{trt_version}.cache"


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise needs_extra(f"the TensorRT backend ({exc}; an NVIDIA GPU and driver too)", "tensorrt") from None
    return trt


# The text graph's ``texts`` axis: the text bank sends up to TEXT_BATCH prompts per call (14
# templates per synonym, so a class of a few synonyms is already 28-56), tuned for a full call.
TEXT_AXIS = (1, TEXT_BATCH, TEXT_BATCH)


def profiles_for(manifest: Manifest, settings: BuildSettings) -> list[tuple[str, tuple, tuple, tuple]]:
    """(name, min, opt, max) per input, each named axis with its own range: ``batch`` runs
    1..max_batch; ``texts`` (the text graph's prompts) 1..TEXT_BATCH; ``height``/``width`` (an
    image graph with dynamic spatial axes) cover the manifest's ``input_range``, tuned for its
    ``opt`` size; fixed axes are as they are. An axis of another name is refused: its range would
    be a guess, and a wrong one rejects every call at run time."""
    spatial = manifest.body.get("input_range") or {}
    axis = {"height": 0, "width": 1}
    out = []
    for spec in manifest.inputs:
        name = spec.name
        if name in settings.extra_profiles:
            lo, opt, hi = settings.extra_profiles[name]
            out.append((name, tuple(lo), tuple(opt), tuple(hi)))
            continue

        def bound(d: int | str, which: str, name: str = name) -> int:
            if not isinstance(d, str):
                return int(d)
            if d in axis and spatial:
                return int(spatial[which][axis[d]])
            slot = ("min", "opt", "max").index(which)
            if d == "batch":
                return (1, settings.max_batch, settings.max_batch)[slot]
            if d == "texts":
                return TEXT_AXIS[slot]
            raise InvalidInputError(
                f"input {name!r} has a dynamic axis {d!r} with no known range; name it in "
                "BuildSettings.extra_profiles as (min, opt, max) shapes"
            )

        lo, opt, hi = (tuple(bound(d, which) for d in spec.shape) for which in ("min", "opt", "max"))
        out.append((name, lo, opt, hi))
    return out


def gpu_identity() -> tuple[str, str]:
    """(name, compute capability) of CUDA device 0, through pycuda."""
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise needs_extra(f"the TensorRT backend ({exc})", "tensorrt") from None
    cuda.init()
    device = cuda.Device(0)
    major, minor = device.compute_capability()
    return device.name(), f"{major}.{minor}"


def engine_key(manifest: Manifest, settings: BuildSettings, trt_version: str) -> EngineKey:
    """What an engine built from the artefact ``manifest`` with ``settings`` on this GPU is valid for."""
    name, capability = gpu_identity()
    settings = settings.for_artifact(manifest)
    profiles = tuple((n, tuple(a), tuple(b), tuple(c)) for n, a, b, c in profiles_for(manifest, settings))
    resolved = settings.precision or "fp32"  # for_artifact resolved it; an artefact without one is fp32
    precision = f"{resolved}+tf32" if resolved == "fp32" and settings.allow_tf32 else resolved
    return EngineKey(artifact_digest(manifest), trt_version, name, capability, precision, profiles)


def build_engine(onnx_dir: str | Path, settings: BuildSettings) -> bytes:
    """Build a serialized engine (plan) from the ONNX artefact in ``onnx_dir``."""
    trt = import_tensorrt()
    onnx_dir = Path(onnx_dir)
    manifest = read_manifest(onnx_dir)
    settings = settings.for_artifact(manifest)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0
    if major >= 11 or settings.precision == "fp32" and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        # TensorRT 11 knows only strongly typed networks; on 10, fp32 asks for exactly the graph's types.
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_dir / manifest.files["model"].name)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{onnx_dir}: TensorRT could not parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    if settings.precision == "fp32" and not settings.allow_tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default: an "fp32" engine would round to 10 bits
    if major < 11 and settings.precision in ("fp16", "bf16"):
        config.set_flag(trt.BuilderFlag.FP16 if settings.precision == "fp16" else trt.BuilderFlag.BF16)
    elif major >= 11 and settings.precision != manifest.precision:
        raise EngineBuildError(
            f"TensorRT {trt.__version__} builds the graph's own precision ({manifest.precision}); "
            f"export an {settings.precision} ONNX graph for an {settings.precision} engine"
        )
    profile = builder.create_optimization_profile()
    for name, lo, opt, hi in profiles_for(manifest, settings):
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    timing = settings.timing_cache
    if timing is None and settings.timing_cache_dir is not None:
        timing = timing_cache_file(settings.timing_cache_dir, trt.__version__)
    cache_bytes = timing.read_bytes() if timing is not None and timing.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise EngineBuildError(f"{timing}: TensorRT refused the timing cache (another version or GPU?); delete it")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"{onnx_dir}: TensorRT returned no engine (see its log above for the reason)")
    if timing is not None:
        timing.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(timing, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)
