"""What only a GPU can show, in one run: the CUDA kernels of knnclip._C against the CPU kernels
at the real sizes (largest difference, fp32 and fp16 inputs; the pixel decisions' agreement) with
their timings, and, where present, the GPU paths of the engine: each model on ONNX Runtime CUDA,
torch CUDA and TensorRT against ONNX Runtime on the CPU, the faiss-gpu search against the CPU
index, and with ``--models`` the device-resident pipeline against the host pipeline on the same
models and database (semantic agreement >= 99.9%, the same panoptic segments, instance scores
within 1e-3; its per-stage device times and the bytes it moved per image). Model timings include
the host copies of inputs and outputs (``Session.infer`` takes and returns NumPy arrays).

    python benchmarks/gpu_check.py                          # the ops
    python benchmarks/gpu_check.py --models knnclip-demo/models   # and the models on every GPU backend
    python benchmarks/gpu_check.py --models knnclip-bench/models  # ... with torch weights: the pipeline too

Writes benchmarks/results/gpu_check.{json,md}. Exit status: 0 when every check that ran passed,
1 when one failed (marked FAIL; a backend that is not installed here is reported, not failed),
3 when no CUDA device is usable, with the reason (built without CUDA, no driver, a driver older than
the CUDA runtime, no device) and nothing written; ``--skip-without-gpu`` makes that case exit 0.
``--dry-run`` runs every step with NumPy arrays on the CPU, and the device pipeline on torch
tensors on the CPU (CI runs it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS, machine, summarize, write_json, write_text

from knnclip import _C
from knnclip.engine import ops
from knnclip.engine.errors import BackendUnavailableError

MASK_HW = (200, 272)
MODEL_TOLERANCE = 5e-3  # max |GPU - CPU| relative to max |CPU| per model output (fp32 graphs)
TOLERANCE = {"float32": 2e-4, "float16": 2e-3}  # max |GPU - CPU| relative to max |CPU|


class HostArrays:
    """``--dry-run``: NumPy arrays, so the CPU kernels run on both sides (exercises this script
    where no GPU is; its numbers mean nothing)."""

    name, gpu = "numpy (dry run)", "none (dry run on the CPU)"

    def put(self, array: np.ndarray) -> np.ndarray:
        return array

    def sync(self) -> None:
        pass


def _on_device(result: Any) -> bool:
    """A DeviceArray result (a build without CUDA has no such type)."""
    return ops.DeviceArray is not None and isinstance(result, ops.DeviceArray)


class DeviceArrays:
    """Puts NumPy arrays on the GPU (CuPy or torch, whichever is installed) and synchronises."""

    def __init__(self) -> None:
        try:
            import cupy

            self.name, self.module = "cupy", cupy
            self.gpu = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        except ImportError:
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError("torch sees no CUDA device") from None
            self.name, self.module, self.gpu = "torch", torch, torch.cuda.get_device_name()

    def put(self, array: np.ndarray) -> Any:
        if self.name == "cupy":
            return self.module.asarray(array)
        return self.module.from_numpy(np.ascontiguousarray(array)).cuda()

    def sync(self) -> None:
        if self.name == "cupy":
            self.module.cuda.Device().synchronize()
        else:
            self.module.cuda.synchronize()


def _time(fn: Callable[[], Any], sync: Callable[[], None], repeats: int) -> dict[str, float]:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return summarize(times)


def op_cases(rng: np.random.Generator) -> list[tuple[str, str, str, Callable, tuple, Callable | None]]:
    """(op, size, dtype, function, NumPy inputs, its NumPy float64 definition or None)."""
    from knnclip.engine.bench import reference_ops as ref

    cases = []
    for dtype in ("float32", "float16"):
        for size, shape in (("DINOv2 keys 1536x37x37", (1536, 37, 37)), ("CLIP dense 1536x25x34", (1536, 25, 34))):
            features = rng.standard_normal(shape).astype(dtype)
            masks = (rng.standard_normal((250, *MASK_HW)) * 3).astype(dtype)
            cases.append(
                ("mask_pool", f"{size}, 250 masks 200x272", dtype, _C.mask_pool, (features, masks), ref.mask_pool)
            )
        for classes in (150, 847):
            probs = rng.dirichlet(np.ones(classes), 250).astype(dtype)
            logits = (rng.standard_normal((250, *MASK_HW)) * 3).astype(dtype)
            cases.append(
                (
                    "semantic_merge",
                    f"250x{classes}, masks 200x272",
                    dtype,
                    _C.semantic_merge,
                    (probs, logits),
                    ref.semantic_merge if classes == 150 else None,
                )
            )
    features = rng.standard_normal((2, 1536, 37, 37)).astype(np.float32)
    masks = (rng.standard_normal((2, 250, *MASK_HW)) * 3).astype(np.float32)
    cases.append(("mask_pool", "batch of 2, 250 masks each", "float32", _C.mask_pool, (features, masks), ref.mask_pool))
    empty = np.zeros((0, *MASK_HW), np.float32)
    cases.append(("mask_pool", "no masks", "float32", _C.mask_pool, (features[0], empty), None))
    rows = 8_500_000  # past 65,535 blocks x 128 threads: the grid-stride loop's rows
    sims = rng.uniform(-1, 1, (rows, 1)).astype(np.float32)
    labels = rng.integers(-1, 2, (rows, 1)).astype(np.int64)
    cases.append(
        (
            "retrieval_probs",
            f"{rows}x1, 2 classes (grid stride)",
            "float32",
            lambda s, lab: _C.retrieval_probs(s, lab, 2, 0.05),
            (sims, labels),
            None,
        )
    )
    for classes in (150, 847):
        sims = rng.uniform(-1, 1, (250, 10)).astype(np.float32)
        labels = rng.integers(-1, classes, (250, 10)).astype(np.int64)
        cases.append(
            (
                "retrieval_probs",
                f"250x10, {classes} classes",
                "float32",
                lambda s, lab, c=classes: _C.retrieval_probs(s, lab, c, 0.05),
                (sims, labels),
                lambda s, lab, c=classes: ref.retrieval_probs(s, lab, c, 0.05),
            )
        )
        base = rng.dirichlet(np.ones(classes), 250).astype(np.float32)
        ret = rng.dirichlet(np.ones(classes) * 0.05, 250).astype(np.float32)
        cases.append(
            (
                "fuse",
                f"250x{classes}",
                "float32",
                lambda b, r: _C.fuse(b, r, 0.5, 0.5),
                (base, ret),
                lambda b, r: ref.fuse(b, r, 0.5, 0.5),
            )
        )
    masks = (rng.standard_normal((50, *MASK_HW)) * 3).astype(np.float32)
    from knnclip.engine.pipeline.postprocess import resize_matrices

    rows, cols = resize_matrices(MASK_HW, (800, 1088), (800, 1066), (768, 1024))
    cases.append(("resample", "50 masks 200x272 to 768x1024", "float32", _C.resample, (masks, rows, cols), None))
    return cases


def decision_cases(rng: np.random.Generator) -> list[tuple[str, str, Callable, tuple]]:
    """(op, size, function, NumPy inputs) of the ops that decide pixels: compared by agreement, since a
    float32 near-tie may go either way on another summation order."""
    logits = (rng.standard_normal((250, *MASK_HW)) * 3).astype(np.float32)
    probs = rng.dirichlet(np.ones(150), 250).astype(np.float32)
    queries = np.sort(rng.choice(250, 60, replace=False)).astype(np.int64)
    scores = rng.random(60).astype(np.float32)
    return [
        ("semantic_argmax", "250x150, masks 200x272", _C.semantic_argmax, (probs, logits)),
        ("panoptic_owner", "60 of 250 masks 200x272", _C.panoptic_owner, (scores, logits, queries)),
    ]


def check_decisions(dev: DeviceArrays | HostArrays, repeats: int) -> list[dict[str, Any]]:
    """Each pixel decision on the device against the CPU kernel's: the fraction decided alike
    (>= 99.9%) and, for panoptic_owner, each mask's pixel count exactly."""
    rows = []
    for op, size, fn, inputs in decision_cases(np.random.default_rng(2)):
        cpu = fn(*inputs)
        on_device = [dev.put(x) for x in inputs]
        result = fn(*on_device)
        dev.sync()
        cpu_parts = cpu if isinstance(cpu, tuple) else (cpu,)
        gpu_parts = [
            r.numpy() if _on_device(r) else np.asarray(r) for r in (result if isinstance(result, tuple) else (result,))
        ]
        agreement = [float(np.mean(np.asarray(a) == g)) for a, g in zip(cpu_parts, gpu_parts, strict=True)]
        row: dict[str, Any] = {"op": op, "size": size, "agreement": agreement}
        row["ok"] = min(agreement[:2]) >= 0.999 and (len(agreement) < 3 or agreement[2] == 1.0)
        row["cpu"] = _time(lambda fn=fn, inputs=inputs: fn(*inputs), lambda: None, max(3, repeats // 4))
        row["gpu"] = _time(lambda fn=fn, d=on_device: fn(*d), dev.sync, repeats)
        rows.append(row)
        print(f"{op:16s} {size:28s} agreement {agreement} {'ok' if row['ok'] else 'FAIL'}", flush=True)
    return rows


def check_pipeline(models: Path, dry_run: bool) -> dict[str, Any]:
    """The device-resident pipeline against the host pipeline (engine/bench/device.py): on the GPU
    with the torch backend (what the device machine has), on a dry run with torch tensors on the CPU."""
    from knnclip.engine.bench.device import compare_pipelines
    from knnclip.engine.demo.synthetic import make_split

    images = [s.image for s in make_split(4, seed=5)]
    backend, device = ("onnxruntime", "cpu") if dry_run else ("torch", "cuda")
    try:
        found = compare_pipelines(models, images, backend=backend, device=device, arrays_device=device)
    except BackendUnavailableError as exc:  # not installed here: reported, not failed
        return {"ok": None, "error": f"{type(exc).__name__}: {exc}"}
    except Exception:  # noqa: BLE001 - a failed check is reported, not raised
        return {"ok": False, "error": traceback.format_exc(limit=3)}
    print(f"pipeline: {'ok' if found['ok'] else 'FAIL'} {found['images']}", flush=True)
    return found


def check_ops(dev: DeviceArrays | HostArrays, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for op, size, dtype, fn, inputs, reference in op_cases(np.random.default_rng(0)):
        cpu = np.asarray(fn(*inputs))
        on_device = [dev.put(x) for x in inputs]
        result = fn(*on_device)
        dev.sync()
        gpu = result.numpy() if _on_device(result) else np.asarray(result)
        scale = float(np.abs(cpu).max(initial=0.0)) or 1.0
        same_shape = gpu.shape == cpu.shape
        error = float(np.abs(gpu - cpu).max(initial=0.0)) / scale if same_shape else float("inf")
        row = {"op": op, "size": size, "dtype": dtype, "max_rel_diff": error, "ok": error <= TOLERANCE[dtype]}
        if reference is not None:  # the definition in float64, from the inputs as they are
            want = reference(*[x.astype(np.float64) if x.dtype.kind == "f" else x for x in inputs])
            diff = float(np.abs(gpu - want).max(initial=0.0) / (np.abs(want).max(initial=0.0) or 1.0))
            row["max_rel_diff_float64"] = diff
            row["ok"] = bool(row["ok"] and diff <= TOLERANCE[dtype])
        row["cpu"] = _time(lambda fn=fn, inputs=inputs: fn(*inputs), lambda: None, max(3, repeats // 4))
        row["gpu"] = _time(lambda fn=fn, d=on_device: fn(*d), dev.sync, repeats)
        rows.append(row)
        print(f"{op:16s} {size:40s} {dtype:8s} diff {error:.2e} {'ok' if row['ok'] else 'FAIL'}", flush=True)
    return rows


def check_errors(dev: DeviceArrays | HostArrays) -> list[dict[str, Any]]:
    """Bad input on the device raises what it raises on the host, before any result."""
    rng = np.random.default_rng(4)
    features = rng.standard_normal((8, 6, 6)).astype(np.float32)
    masks = rng.standard_normal((3, 12, 12)).astype(np.float32)
    nan = features.copy()
    nan[0, 0, 0] = np.nan
    labels = np.array([[0, 5]], np.int64)
    cases = [
        ("NaN in the features", ValueError, lambda: _C.mask_pool(dev.put(nan), dev.put(masks))),
        ("float64 features", TypeError, lambda: _C.mask_pool(dev.put(features.astype(np.float64)), dev.put(masks))),
        (
            "label past num_classes",
            ValueError,
            lambda: _C.retrieval_probs(dev.put(np.ones((1, 2), np.float32)), dev.put(labels), 3, 0.1),
        ),
        (
            "mismatched masks",
            ValueError,
            lambda: _C.semantic_merge(dev.put(np.ones((2, 4), np.float32)), dev.put(masks)),
        ),
    ]
    rows = []
    for name, expected, call in cases:
        try:
            call()
            ok, got = False, "no error"
        except expected as exc:
            ok, got = True, f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - a failed check is reported, not raised
            ok, got = False, f"{type(exc).__name__}: {exc}"
        rows.append({"check": name, "ok": ok, "error": None if ok else got, "raised": got})
        print(f"error path: {name:30s} {'ok' if ok else 'FAIL ' + got}", flush=True)
    return rows


def check_interop() -> list[dict[str, Any]]:
    """What only a device shows about the glue: an input still being written on a side stream,
    the same op through torch and CuPy, through __cuda_array_interface__ and DLPack, a result
    outliving its producer, and no growth of device memory over repeated calls."""
    rows: list[dict[str, Any]] = []

    def record(name: str, run: Callable[[], bool]) -> None:
        try:
            ok, error = bool(run()), None
        except Exception as exc:  # noqa: BLE001 - a failed check is reported, not raised
            ok, error = False, f"{type(exc).__name__}: {exc}"
        rows.append({"check": name, "ok": ok, "error": error})
        print(f"{name:60s} {'ok' if ok else 'FAIL ' + str(error)}", flush=True)

    try:
        import torch
    except ImportError:
        return [{"check": "torch interop", "ok": None, "error": "torch is not installed"}]
    if not torch.cuda.is_available():
        return [{"check": "torch interop", "ok": None, "error": "torch sees no CUDA device"}]
    rng = np.random.default_rng(3)
    features = rng.standard_normal((256, 37, 37)).astype(np.float32)
    masks = (rng.standard_normal((64, 200, 272)) * 3).astype(np.float32)
    expected = _C.mask_pool(features, masks)

    def close(result: Any) -> bool:
        got = result.numpy() if _on_device(result) else torch.as_tensor(result).cpu().numpy()
        return bool(np.abs(got - expected).max() <= 2e-4 * np.abs(expected).max())

    def side_stream() -> bool:
        # The buffers hold zeros; a slow producer on a non-blocking side stream first sleeps on the
        # device, then writes values the buffers never held. An op that does not wait for that
        # stream reads the zeros, and the result is wrong (a race shows, not hides).
        f = torch.zeros(features.shape, device="cuda")
        m = torch.zeros(masks.shape, device="cuda")
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            sleep = getattr(torch.cuda, "_sleep", None)
            if sleep is not None:
                sleep(200_000_000)  # about 0.1 s of GPU cycles
            f.copy_(torch.from_numpy(features).cuda(non_blocking=True))
            m.copy_(torch.from_numpy(masks).cuda(non_blocking=True))
            # torch's interface names no stream, so the op reads the tensors through DLPack with
            # stream= its own stream: torch must order the side stream's work before it
            result = _C.mask_pool(f, m)
        return close(result)

    def default_stream() -> bool:
        # The same race on torch's default stream: the ops run on a non-blocking stream of their
        # own, which the legacy default stream no longer orders implicitly.
        f = torch.zeros(features.shape, device="cuda")
        m = torch.zeros(masks.shape, device="cuda")
        torch.cuda.synchronize()
        sleep = getattr(torch.cuda, "_sleep", None)
        if sleep is not None:
            sleep(200_000_000)
        f.copy_(torch.from_numpy(features).cuda(non_blocking=True))
        m.copy_(torch.from_numpy(masks).cuda(non_blocking=True))
        return close(_C.mask_pool(f, m))

    def via_dlpack() -> bool:
        class OnlyDlpack:
            def __init__(self, t: Any) -> None:
                self.t = t

            def __dlpack__(self, stream: Any = None) -> Any:
                return self.t.__dlpack__(stream=stream)

            def __dlpack_device__(self) -> Any:
                return self.t.__dlpack_device__()

        return close(
            _C.mask_pool(OnlyDlpack(torch.from_numpy(features).cuda()), OnlyDlpack(torch.from_numpy(masks).cuda()))
        )

    def outlives_producer() -> bool:
        f, m = torch.from_numpy(features).cuda(), torch.from_numpy(masks).cuda()
        result = _C.mask_pool(f, m)
        del f, m
        torch.cuda.empty_cache()
        consumer = torch.from_dlpack(result)  # the DeviceArray's memory, no copy
        del result
        return close(consumer)

    def cupy_inputs() -> bool:
        import cupy

        return close(_C.mask_pool(cupy.asarray(features), cupy.asarray(masks)))

    def no_leak() -> bool:
        f, m = torch.from_numpy(features).cuda(), torch.from_numpy(masks).cuda()
        for _ in range(20):
            _C.mask_pool(f, m)
        free_before = torch.cuda.mem_get_info()[0]
        for _ in range(200):
            _C.mask_pool(f, m)
        return free_before - torch.cuda.mem_get_info()[0] < 64 << 20

    record("side-stream producer (torch, through DLPack's stream=)", side_stream)
    record("default-stream producer (the ops' stream is non-blocking)", default_stream)
    record("DLPack-only inputs (stream argument)", via_dlpack)
    record("result outlives its inputs; consumed by torch.from_dlpack", outlives_producer)
    record("CuPy inputs", cupy_inputs)
    record("no device memory growth over 200 calls", no_leak)
    return rows


def check_models(models: Path, repeats: int, device: str = "cuda") -> list[dict[str, Any]]:
    """Each model on every GPU backend against ONNX Runtime on the CPU."""
    from knnclip.engine.backends import open_session

    rows = []
    rng = np.random.default_rng(1)
    for part in ("dinov2", "fcclip/image", "fcclip/text"):
        reference = open_session(models / part, "onnxruntime", "cpu")
        feed = sample_feed(reference, rng)
        expected = reference.infer(feed)
        cpu_time = _time(lambda s=reference, f=feed: s.infer(f), lambda: None, max(2, repeats // 5))
        reference.close()
        for backend in ("onnxruntime", "torch", "tensorrt"):
            row: dict[str, Any] = {"model": part, "backend": backend, "cpu_onnxruntime": cpu_time, "ok": None}
            try:
                session = open_session(models / part, backend, device)
                got = session.infer(feed)
                row["max_rel_diff"] = {
                    name: float(np.abs(got[name] - value).max() / (np.abs(value).max() or 1.0))
                    for name, value in expected.items()
                }
                row["ok"] = max(row["max_rel_diff"].values()) <= MODEL_TOLERANCE
                row["gpu"] = _time(lambda s=session, f=feed: s.infer(f), lambda: None, repeats)
                row["session"] = repr(session)
                session.close()
            except BackendUnavailableError as exc:  # not installed here: reported, not failed
                row["error"] = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # noqa: BLE001 - installed but broken: a failure
                row["error"], row["ok"] = f"{type(exc).__name__}: {exc}", False
            rows.append(row)
            print(f"{part:14s} {backend:12s} {row.get('error') or row['max_rel_diff']}", flush=True)
    return rows


def sample_feed(session: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs at the sizes the graph is built for: a dynamic image graph at its manifest's
    optimum size (TensorRT's profile is tuned there; 1x1 is outside it), a text graph at a full
    class's prompts (14 templates of 2 synonyms) of real token ids, a batch of 1."""
    optimum = (session.manifest.body.get("input_range") or {}).get("opt")
    sizes = {"batch": 1, "texts": 28}
    if optimum:
        sizes |= {"height": int(optimum[0]), "width": int(optimum[1])}
    feed = {}
    for spec in session.inputs:
        shape = [d if isinstance(d, int) and d > 0 else sizes.get(str(d), 1) for d in spec.shape]
        if spec.dtype.kind in "iu":
            feed[spec.name] = rng.integers(1, 400, shape).astype(spec.dtype)
        else:
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feed


def check_faiss_gpu(repeats: int) -> dict[str, Any]:
    """The database searched on the GPU (faiss-gpu, else the exact search through torch or CuPy)
    against the CPU index of the same entries."""
    from knnclip.engine import Database

    rng = np.random.default_rng(2)
    with tempfile.TemporaryDirectory() as work:
        probe = Path(work) / "probe"
        Database.create(probe, 8).close()
        try:  # before building 10^5 entries: is there a GPU search at all?
            Database.open(probe, device="cuda", read_only=True).close()
        except BackendUnavailableError as exc:  # neither faiss-gpu nor torch with CUDA: not installed
            return {"error": f"not installed: {exc}", "ok": None}
        except Exception as exc:  # noqa: BLE001 - a failed check is reported, not raised
            return {"error": f"{type(exc).__name__}: {exc}", "ok": False}
        path = Path(work) / "db"
        db = Database.create(path, 1536)
        for c in range(150):
            db.add_class(f"class{c}")
        for _ in range(10):
            db.add(rng.standard_normal((10000, 1536)).astype(np.float32), rng.integers(0, 150, 10000))
        queries = rng.standard_normal((250, 1536)).astype(np.float32)
        cpu = db.search(queries, 10)
        cpu_time = _time(lambda: db.search(queries, 10), lambda: None, max(3, repeats // 4))
        db.close()
        try:
            gpu_db = Database.open(path, device="cuda", read_only=True)
        except Exception as exc:  # noqa: BLE001 - a failed check is reported, not raised
            return {"error": f"{type(exc).__name__}: {exc}"}
        gpu = gpu_db.search(queries, 10)
        agreement = float(np.mean(cpu.labels[:, 0] == gpu.labels[:, 0]))
        out = {
            "entries": 100000,
            "ok": agreement >= 0.99,
            "top1_agreement": agreement,
            "max_sim_diff": float(np.abs(cpu.sims - gpu.sims).max()),
            "cpu": cpu_time,
            "gpu": _time(lambda: gpu_db.search(queries, 10), lambda: None, repeats),
        }
        gpu_db.close()
        return out


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"# GPU check: {result['gpu']}",
        "",
        f"Host {m['cpu']}, {m['cores']} cores; knnclip._C archs {result['build']['cuda_archs']}, CUDA runtime "
        f"{result['build']['cuda_runtime']}; device arrays from {result['arrays']}. Produced by "
        f"`{result['command']}`.",
        "",
        "## knnclip._C: CUDA kernels against the CPU kernels",
        "",
        "| op | size | dtype | max rel. diff to CPU / float64 | CPU median ms | GPU median ms | speed-up | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["ops"]:
        cpu, gpu = r["cpu"]["median_s"] * 1e3, r["gpu"]["median_s"] * 1e3
        f64 = f" / {r['max_rel_diff_float64']:.1e}" if "max_rel_diff_float64" in r else ""
        lines.append(
            f"| {r['op']} | {r['size']} | {r['dtype']} | {r['max_rel_diff']:.1e}{f64} | {cpu:.3f} | {gpu:.3f} "
            f"| {cpu / gpu:.1f}x | {'ok' if r['ok'] else 'FAIL'} |"
        )
    lines += [
        "",
        "## Pixel decisions: CUDA kernels against the CPU kernels",
        "",
        "| op | size | pixels decided alike (owner, own, mask pixel counts) | CPU median ms | GPU median ms | |",
        "|---|---|---|---|---|---|",
    ]
    for r in result.get("decisions", []):
        cpu, gpu = r["cpu"]["median_s"] * 1e3, r["gpu"]["median_s"] * 1e3
        alike = ", ".join(f"{a:.4%}" for a in r["agreement"])
        lines.append(f"| {r['op']} | {r['size']} | {alike} | {cpu:.3f} | {gpu:.3f} | {'ok' if r['ok'] else 'FAIL'} |")
    p = result.get("pipeline")
    if p:
        lines += ["", "## The device-resident pipeline against the host pipeline", ""]
        if "error" in p:
            lines.append(f"not run: {p['error']}")
        else:
            lines.append(f"Arrays {p['arrays']}; sessions {', '.join(p['sessions'].values())}.")
            lines += [
                "",
                "| image | semantic agreement | same segments | instances | max instance score diff | |",
                "|---|---|---|---|---|---|",
            ]
            for i, r in enumerate(p["images"]):
                lines.append(
                    f"| {i} | {r['semantic_agreement']:.4%} | {r['same_segments']} ({r['segments']}) | "
                    f"{r['instances']} | {r['max_instance_score_diff']:.1e} | {'ok' if r['ok'] else 'FAIL'} |"
                )
            stages = ", ".join(f"{k} {v:.2f}" for k, v in p["stages_ms"].items())
            moved = "; ".join(
                f"{d}: " + ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in t.items())
                for d, t in p["bytes_moved_per_image"].items()
            )
            lines += ["", f"Median stage times (ms): {stages}.", "", f"Bytes moved per image: {moved}."]
    if result.get("models"):
        lines += [
            "",
            "## Models: GPU backends against ONNX Runtime on the CPU",
            "",
            "| model | backend | max rel. diff per output | GPU median ms | CPU median ms |",
            "|---|---|---|---|---|",
        ]
        for r in result["models"]:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['backend']} | not run: {r['error'][:120]} | - | - |")
                continue
            diffs = ", ".join(f"{k} {v:.1e}" for k, v in r["max_rel_diff"].items())
            lines.append(
                f"| {r['model']} | {r['backend']} | {diffs} | {r['gpu']['median_s'] * 1e3:.2f} | "
                f"{r['cpu_onnxruntime']['median_s'] * 1e3:.1f} |"
            )
    if result.get("interop") or result.get("errors"):
        lines += ["", "## Error paths and interop: streams, DLPack, lifetime, memory", "", "| check | |", "|---|---|"]
        for r in result.get("errors", []) + result.get("interop", []):
            state = "ok" if r["ok"] else ("not run" if r["ok"] is None else "FAIL")
            lines.append(f"| {r['check']} | {state}{': ' + r['error'] if r['error'] else ''} |")
    f = result.get("faiss_gpu")
    if f:
        lines += ["", "## Database search on the GPU (faiss-gpu), 10^5 x 1536, 250 queries, k=10", ""]
        lines.append(
            f"not run: {f['error']}"
            if "error" in f
            else f"top-1 agreement {f['top1_agreement']:.4f}, max similarity difference {f['max_sim_diff']:.1e}, "
            f"CPU {f['cpu']['median_s'] * 1e3:.1f} ms, GPU {f['gpu']['median_s'] * 1e3:.2f} ms"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, help="a models directory (knnclip demo writes knnclip-demo/models)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-faiss", action="store_true", help="skip the faiss-gpu check")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where gpu_check.json and .md go")
    parser.add_argument("--dry-run", action="store_true", help="CPU on both sides: tests this script without a GPU")
    parser.add_argument("--skip-without-gpu", action="store_true", help="exit 0 (not 3) where no device is usable")
    args = parser.parse_args()
    build = _C.build_info()
    if not args.dry_run and not _C.cuda_available():
        print(f"gpu_check: no usable CUDA device: {_C.cuda_status()}; nothing was checked")
        return 0 if args.skip_without_gpu else 3
    dev = HostArrays() if args.dry_run else DeviceArrays()
    result: dict[str, Any] = {
        "machine": machine(),
        "build": build,
        "gpu": dev.gpu,
        "arrays": dev.name,
        "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]),
    }
    result["ops"] = check_ops(dev, args.repeats)
    result["decisions"] = check_decisions(dev, args.repeats)
    result["errors"] = check_errors(dev)
    if not args.dry_run:
        result["interop"] = check_interop()
    if args.models:
        result["models"] = check_models(args.models, args.repeats, "cpu" if args.dry_run else "cuda")
        result["pipeline"] = check_pipeline(args.models, args.dry_run)
    if not args.no_faiss and not args.dry_run:
        try:
            result["faiss_gpu"] = check_faiss_gpu(args.repeats)
        except Exception:  # noqa: BLE001 - a failed check is reported, not raised
            result["faiss_gpu"] = {"error": traceback.format_exc(limit=2), "ok": False}
    write_json("gpu_check", result, args.out)
    write_text("gpu_check.md", markdown(result), args.out)
    print(markdown(result))
    results = [r["ok"] for r in result["ops"]] + [r["ok"] for r in result.get("models", [])]
    results += [r["ok"] for r in result.get("interop", []) + result["errors"] + result["decisions"]]
    if "pipeline" in result:
        results.append(result["pipeline"]["ok"])
    if "faiss_gpu" in result:
        results.append(result["faiss_gpu"].get("ok", False))  # None (not installed) is reported, not failed
    return 0 if all(ok is not False for ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
