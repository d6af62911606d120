"""The one benchmark harness, shared by ``knnclip bench`` and the scripts in ``benchmarks/``:
the machine a number was measured on, timing that resists a noisy machine, worker processes
whose memory peak is their own, and result files written atomically.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from knnclip.engine.fsutil import atomic_write_bytes
from knnclip.engine.info import cpu_name

__all__ = [
    "machine",
    "machine_slug",
    "percentiles",
    "peak_rss_mib",
    "pyplot",
    "spawn",
    "spawn_module",
    "summarize",
    "time_calls",
    "time_torch",
    "timeit_interleaved",
    "write_json",
    "write_text",
]

VERSIONED = ("numpy", "torch", "onnxruntime", "faiss")


def machine_slug() -> str:
    """A short file-name-safe name for this machine: CPU model and core count."""
    short = "".join(ch if ch.isalnum() else "-" for ch in cpu_name().lower()).strip("-")
    return f"{short[:32].strip('-')}-{os.cpu_count()}c"


def machine() -> dict[str, Any]:
    """CPU, cores, memory, Python and library versions: recorded beside every number."""
    memory_gib = None
    try:
        memory_gib = round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    from knnclip import _C

    return {
        "name": machine_slug(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "platform": platform.platform(),
        "versions": versions,
        "knnclip_build": _C.build_info(),
    }


def pyplot() -> Any:
    """matplotlib.pyplot, or None (``render.pyplot``), imported when a plot is made: the render
    module needs Pillow, which a GPU machine running only ``gpu_check`` may lack."""
    from knnclip.engine.render import pyplot as render_pyplot

    return render_pyplot()


def peak_rss_mib() -> float:
    """This process's resident-set high-water mark in MiB. ``/proc/self/status`` VmHWM belongs to
    the address space and starts afresh at exec; ``getrusage``'s ru_maxrss would carry the parent's
    peak into a spawned worker (the fallback where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# Timing -----------------------------------------------------------------------------------------
def summarize(times: Sequence[float]) -> dict[str, float]:
    """Median and spread of wall-clock seconds.

    >>> summarize([3.0, 1.0, 2.0])["median_s"]
    2.0
    """
    times = sorted(times)
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {
        "median_s": statistics.median(times),
        "p25_s": quartiles[0],
        "p75_s": quartiles[2],
        "min_s": times[0],
        "repeats": len(times),
    }


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99, min, max and count of per-item latencies.

    >>> percentiles([1.0, 2.0, 3.0])["p50"]
    2.0
    """
    a = np.asarray(values, np.float64)
    return {
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "min": float(a.min()),
        "max": float(a.max()),
        "n": len(values),
    }


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


def timeit_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: dict[str, int], warmup: int = 1, rounds: int = 3
) -> dict[str, dict[str, float]]:
    """Time several implementations in alternating blocks, ``rounds`` blocks each, so slow drift of
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
    out: dict[str, Any] = {
        **stats,
        "baseline_rss_mib": baseline,
        "peak_rss_mib": peak_rss_mib(),
        "threads": torch.get_num_threads(),
    }
    if device == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu"] = torch.cuda.get_device_name()
    return out


# Worker processes -------------------------------------------------------------------------------
def _run_worker(command: list[str]) -> dict[str, Any]:
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        # The exception's own line (a traceback's last), not the traceback: it goes into one-line reports
        last = [line.strip() for line in proc.stderr.strip().splitlines() if line.strip()][-1:]
        return {"error": f"worker exited {proc.returncode}" + (f": {last[0]}" if last else "")}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spawn(script: str, case: dict[str, Any]) -> dict[str, Any]:
    """Run ``script --worker CASE`` in a fresh process (its memory peak is its own) and return the
    JSON it prints last, or ``{"error": ...}`` with the end of its standard error."""
    return _run_worker([sys.executable, script, "--worker", json.dumps(case)])


def spawn_module(module: str, case: dict[str, Any]) -> dict[str, Any]:
    """:func:`spawn` for ``python -m module CASE``."""
    return _run_worker([sys.executable, "-m", module, json.dumps(case)])


# Result files -----------------------------------------------------------------------------------
def write_text(name: str, text: str, directory: Path) -> Path:
    """Write ``directory/name`` atomically (a temporary file, then a rename)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    atomic_write_bytes(path, text.encode())
    return path


def write_json(name: str, payload: dict[str, Any], directory: Path) -> Path:
    """``directory/NAME.json``, indented, written atomically."""
    return write_text(f"{name}.json", json.dumps(payload, indent=2) + "\n", directory)
