"""Shared by the benchmark scripts: machine description, timing, and result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from knnclip.engine.info import cpu_name
from knnclip.engine.info import peak_rss_mib as rss_mib

__all__ = [
    "RESULTS", "machine", "pyplot", "rss_mib", "spawn", "summarize", "time_calls", "time_torch", "timeit_interleaved",
    "write_json", "write_text",
]  # fmt: skip
RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # so the scripts can import tests.reference_ops
    sys.path.insert(0, str(REPO))


def machine() -> dict[str, Any]:
    """CPU, cores, memory, Python and library versions: recorded beside every number."""
    cpu = cpu_name()
    memory_gib = None
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory_gib = round(pages / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("numpy", "torch", "onnxruntime", "faiss"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    from knnclip import _C

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "platform": platform.platform(),
        "versions": versions,
        "knnclip_build": _C.build_info(),
    }


def summarize(times: list[float]) -> dict[str, float]:
    """Median and spread of wall-clock seconds."""
    times = sorted(times)
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {
        "median_s": statistics.median(times),
        "p25_s": quartiles[0],
        "p75_s": quartiles[2],
        "min_s": times[0],
        "repeats": len(times),
    }


def timeit_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: dict[str, int], warmup: int = 1, rounds: int = 3
) -> dict[str, dict[str, float]]:
    """Time several implementations in alternating blocks, `rounds` blocks each, so slow drift of
    the machine (other tenants, clock) falls on all of them alike. Each block starts with an
    untimed call: BLAS and OpenMP worker threads keep spinning for a while after a call and
    would otherwise steal the cores from the first timed call of the next implementation."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(rounds):
        for name, fn in fns.items():
            n = repeats[name] // rounds + (1 if round_ < repeats[name] % rounds else 0)
            if n == 0:
                continue
            fn()  # settle: see the docstring
            for _ in range(n):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: summarize(t) for name, t in times.items()}


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None where matplotlib is not installed (the plots
    are optional; the JSON and Markdown are not)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_json(name: str, payload: dict[str, Any], directory: Path = RESULTS) -> Path:
    return write_text(f"{name}.json", json.dumps(payload, indent=2) + "\n", directory)


def write_text(name: str, text: str, directory: Path = RESULTS) -> Path:
    """Write ``directory/name`` atomically (a temporary file, then a rename)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int) -> dict[str, float]:
    """``summarize`` of ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return summarize(times)


def time_torch(model: Any, x: Any, device: str, warmup: int, repeats: int, baseline: float) -> dict[str, Any]:
    """Time ``model(x)`` in inference mode (synchronised on CUDA), with the memory peaks: the
    process's over ``baseline`` (taken before the model was built) and, on CUDA, the allocator's."""
    import torch

    def run() -> None:
        with torch.inference_mode():
            model(x)
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stats = time_calls(run, warmup, repeats)
    out = {**stats, "baseline_rss_mib": baseline, "peak_rss_mib": rss_mib(), "threads": torch.get_num_threads()}
    if device == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu"] = torch.cuda.get_device_name()
    return out


def spawn(script: str, case: dict[str, Any]) -> dict[str, Any]:
    """Run ``script --worker CASE`` in a fresh process (its memory peak is its own) and return the
    JSON it prints last, or ``{"error": ...}``."""
    proc = subprocess.run(
        [sys.executable, script, "--worker", json.dumps(case)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])
