"""ONNX export: trace a module at fixed sizes (dynamic batch), check the graph with
``onnx.checker``, run it in ONNX Runtime against the torch module, and only then publish the
artefact directory (``model.onnx`` [+ ``model.onnx.data``], ``manifest.json``) atomically.

:func:`export_graph` does this for any module; each model's exporter lives beside it
(``knnclip.export.dinov2.onnx``, ``knnclip.export.fcclip.onnx``)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from knnclip.engine.artifact import Manifest, read_manifest, write_manifest
from knnclip.engine.errors import ArtifactExistsError, InvalidInputError, KnnclipError

MIN_OPSET = 17
DEFAULT_OPSET = 17
# (ONNX Runtime outputs, torch outputs) -> (relative errors by name, details for the manifest)
Comparison = Callable[[Sequence[np.ndarray], Sequence[torch.Tensor]], tuple[dict[str, float], dict[str, Any]]]
MODEL_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
# Relative L2 error between ONNX Runtime and the fp32 torch model that an export must reach.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
# Protobuf caps a model file at 2 GiB; above this the weights go to one external data file.
_EXTERNAL_DATA_BYTES = 1 << 30


class ExportVerificationError(KnnclipError):
    """The exported graph does not reproduce the torch model within the tolerance."""


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    model_path: Path
    manifest: Manifest

    @property
    def rel_l2_error(self) -> float:
        return float(self.manifest.body["verification"]["rel_l2_error"])


def state_dict_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the model's tensors (name, dtype, shape, bytes, in name order): the same for
    the same weights whichever file layout they were loaded from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def rel_l2(actual: np.ndarray, reference: np.ndarray) -> float:
    a = np.asarray(actual, np.float64)
    r = np.asarray(reference, np.float64)
    return float(np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-30))


def parse_size(size: int | str | tuple[int, int]) -> tuple[int, int]:
    """518, "518", "518x686" or (518, 686) -> (height, width)."""
    if isinstance(size, tuple):
        height, width = size
    elif isinstance(size, int):
        height = width = size
    else:
        parts = str(size).lower().split("x")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            raise InvalidInputError(f"size must be H or HxW in pixels (e.g. 518 or 518x686), got {size!r}")
        height, width = int(parts[0]), int(parts[-1])
    return int(height), int(width)


@dataclass(frozen=True)
class Graph:
    """What to trace: ``module(*inputs.values())`` returns the outputs named ``outputs``, in order.

    ``export_module`` is the module traced into the graph (an fp16 copy, say); ``module`` is the
    fp32 reference it is verified against. ``dynamic_axes`` as ``torch.onnx.export`` takes them.
    """

    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    export_module: torch.nn.Module | None = None


WEIGHTS_NAME = "weights.pt"


def export_graph(
    graph: Graph,
    out_dir: str | os.PathLike[str],
    manifest: dict[str, Any],
    *,
    precision: str,
    tolerance: float | dict[str, float],
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    torch_weights: bool = False,
    extra_files: dict[str, Path] | None = None,
    compare: Comparison | None = None,
    extra_feeds: Sequence[dict[str, torch.Tensor]] = (),
) -> ExportResult:
    """Trace ``graph`` into ``out_dir/model.onnx``, check it with ``onnx.checker``, run it in ONNX
    Runtime on the sample inputs and compare every output with the torch module (relative L2 error
    at most ``tolerance``: one figure for all outputs, or one per output), then write the manifest
    (``manifest`` plus the files, opset, precision, weights hash and verification) and publish the
    directory atomically. ``extra_files`` (role -> a file) are copied in beside the graph and listed
    in the manifest with their SHA-256, like every payload file. ``compare(onnx outputs, torch
    outputs) -> (errors by name, details)`` replaces the plain per-output comparison where an
    output cannot be compared element by element (FC-CLIP's ``ov_embed``, which pools under
    binarised masks); ``tolerance`` then bounds each error it returns. ``extra_feeds`` are further
    inputs (other sizes of a graph with dynamic axes) checked the same way; the worst error counts.

    Raises
    ------
    ExportVerificationError
        When an output differs by more than ``tolerance``; nothing is published then.
    ArtifactExistsError
        When ``out_dir`` exists and ``overwrite`` is false.
    """
    import onnx
    import onnxruntime as ort

    if opset < MIN_OPSET:
        raise InvalidInputError(f"opset {opset} is too old; use {MIN_OPSET} or newer")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ArtifactExistsError(
            f"{out} already exists; choose another directory or pass overwrite=True (--overwrite)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        model_path, large = _write_graph(graph, opset, staging)
        onnx.checker.check_model(str(model_path), full_check=True)
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        errors: dict[str, float] = {}
        details: dict[str, Any] = {}
        for feed in (graph.inputs, *extra_feeds):
            with torch.no_grad():
                reference = _as_tuple(graph.module(*feed.values()))
            actual = session.run(list(graph.outputs), {k: v.numpy() for k, v in feed.items()})
            if compare is None:
                found = {n: rel_l2(a, r.numpy()) for n, a, r in zip(graph.outputs, actual, reference, strict=True)}
            else:
                found, more = compare(actual, reference)
                details = details or more
            errors = {n: max(e, errors.get(n, 0.0)) for n, e in found.items()}
        del session
        limits = tolerance if isinstance(tolerance, dict) else dict.fromkeys(errors, tolerance)
        failed = {name: e for name, e in errors.items() if not e <= limits[name]}
        error = max(errors.values())
        if failed:
            worst = max(failed, key=failed.__getitem__)
            raise ExportVerificationError(
                f"the {precision} ONNX graph differs from the torch model by {failed[worst]:.3g} relative L2 error "
                f"in {worst!r} (tolerance {limits[worst]:g}); nothing was written to {out}"
            )
        files = {"model": MODEL_NAME, **({"data": DATA_NAME} if large else {})}
        if torch_weights:
            torch.save(graph.module.state_dict(), staging / WEIGHTS_NAME)
            files["torch_weights"] = WEIGHTS_NAME
        for role, source in (extra_files or {}).items():
            shutil.copyfile(source, staging / source.name)
            files[role] = source.name
        written = write_manifest(
            staging,
            {
                **manifest,
                "files": files,
                "opset": opset,
                "precision": precision,
                "weights_sha256": state_dict_sha256(graph.module),
                "verification": {
                    "rel_l2_error": error,
                    "rel_l2_error_per_output": errors,
                    "tolerance": tolerance,
                    "reference": "torch fp32 on seeded sample inputs",
                    **details,
                    "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
                },
                "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
            },
        )
        _publish(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    read_manifest(out, manifest["kind"])  # what was published reads back and hashes as written
    return ExportResult(out, out / MODEL_NAME, written)


def _as_tuple(x: Any) -> tuple[torch.Tensor, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _write_graph(graph: Graph, opset: int, directory: Path) -> tuple[Path, bool]:
    """Trace ``graph`` into ``directory/model.onnx`` (weights in one external file when large).
    Returns the path and whether the weights are external."""
    import onnx

    raw_dir = directory / "raw"
    raw_dir.mkdir()
    module = graph.export_module if graph.export_module is not None else graph.module
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            module,
            tuple(graph.inputs.values()),
            str(raw_dir / MODEL_NAME),
            dynamo=False,
            opset_version=opset,
            input_names=list(graph.inputs),
            output_names=list(graph.outputs),
            dynamic_axes=graph.dynamic_axes,
            do_constant_folding=True,
        )
    # The exporter itself spills tensors to files beside the model above 2 GiB: count them all.
    large = sum(f.stat().st_size for f in raw_dir.iterdir()) > _EXTERNAL_DATA_BYTES
    proto = onnx.load(str(raw_dir / MODEL_NAME), load_external_data=True)
    proto.producer_name = "knnclip"
    model_path = directory / MODEL_NAME
    onnx.save_model(
        proto,
        str(model_path),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=DATA_NAME,
        convert_attribute=True,  # folded constants (DINOv2's position embedding) are nodes, not initializers
    )
    del proto
    shutil.rmtree(raw_dir)
    return model_path, large


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``staging`` directory to ``out``; an existing ``out`` is swapped out first."""
    _fsync_tree(staging)
    old = None
    if out.exists():
        if not overwrite:
            raise ArtifactExistsError(f"{out} appeared during the export; nothing was replaced")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(staging, out)
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(old)
