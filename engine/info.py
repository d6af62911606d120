"""What this installation can run: the compiled ops' build, the backends found, the devices.

Every probe is an import or a query that cannot fail loudly: a missing optional package is
reported as missing, never raised.
"""

from __future__ import annotations

import importlib
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

from knnclip.engine import ops


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, or what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _module_version(name: str) -> str | None:
    try:
        module = importlib.import_module(name)
    except Exception:  # noqa: BLE001 - an optional package may be missing or broken; report, don't raise
        return None
    return str(getattr(module, "__version__", "unknown"))


def _onnxruntime() -> dict[str, Any]:
    version = _module_version("onnxruntime")
    if version is None:
        return {"installed": False}
    import onnxruntime

    return {"installed": True, "version": version, "providers": onnxruntime.get_available_providers()}


def _faiss() -> dict[str, Any]:
    version = _module_version("faiss")
    if version is None:
        return {"installed": False}
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return {"installed": True, "version": version, "gpus": int(gpus)}


def _torch() -> dict[str, Any]:
    version = _module_version("torch")
    if version is None:
        return {"installed": False}
    import torch

    return {"installed": True, "version": version, "cuda": bool(torch.cuda.is_available())}


def _openvino() -> dict[str, Any]:
    version = _module_version("openvino")
    if version is None:
        return {"installed": False}
    import openvino as ov

    try:
        capabilities = list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # noqa: BLE001 - a broken plugin: report it, don't raise
        capabilities = []
    return {"installed": True, "version": version, "cpu_capabilities": capabilities}


def _backend_choices() -> dict[str, Any]:
    """What ``backend="auto"`` measured on this machine (backends/choice.py), per record."""
    from knnclip.engine.backends.choice import RECORDS_FOLDER, recorded_choices
    from knnclip.engine.cache import engine_cache_root

    root = engine_cache_root()
    return {"folder": str(root / RECORDS_FOLDER), "chosen": recorded_choices(root)}


def _gpus() -> list[str]:
    """GPU names from nvidia-smi, empty without a driver."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def collect() -> dict[str, Any]:
    """Everything `knnclip info` reports, as plain data."""
    return {
        "knnclip": ops.build_info(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "backends": {
            "onnxruntime": _onnxruntime(),
            "faiss": _faiss(),
            "torch": _torch(),
            "tensorrt": {"installed": _module_version("tensorrt") is not None, "version": _module_version("tensorrt")},
            "pycuda": {"installed": _module_version("pycuda") is not None},
            "openvino": _openvino(),
        },
        "auto_choices": _backend_choices(),
        "devices": {"cuda_available": ops.cuda_available(), "cuda_status": ops.cuda_status(), "gpus": _gpus()},
    }


def format_text(info: dict[str, Any]) -> str:
    """A short human-readable report."""
    build = info["knnclip"]
    cuda = f"yes, {', '.join(build['cuda_archs'])} (CUDA {build['cuda_runtime']})" if build["cuda"] else "no"
    lines = [
        f"knnclip {build['version']}  (python {info['python']}, {info['platform']})",
        "compiled ops (knnclip._C):",
        f"  cuda kernels : {cuda}",
        f"  cpu kernels  : {build['cpu_isa']} (compiled: {', '.join(build['cpu_isas'])}), "
        f"openmp {'on' if build['openmp'] else 'off'}, {build['threads']} threads",
        f"  compiler     : {build['compiler']}",
        "backends:",
    ]
    for name, b in info["backends"].items():
        if not b["installed"]:
            lines.append(f"  {name:<12} not installed")
            continue
        extra = ""
        if "providers" in b:
            extra = "  providers: " + ", ".join(b["providers"])
        elif "gpus" in b:
            extra = f"  gpus: {b['gpus']}"
        elif "cuda" in b:
            extra = f"  cuda: {b['cuda']}"
        elif "cpu_capabilities" in b:
            extra = "  cpu: " + ", ".join(b["cpu_capabilities"])
        lines.append(f"  {name:<12} {b.get('version') or ''}{extra}")
    chosen = info["auto_choices"]["chosen"]
    if chosen:
        counts = ", ".join(f"{name} {count}" for name, count in sorted(chosen.items()))
        lines.append(f"  auto on the CPU chose: {counts} (records in {info['auto_choices']['folder']})")
    devices = info["devices"]
    lines.append("devices:")
    usable = "yes" if devices["cuda_available"] else f"no: {devices['cuda_status']}"
    lines.append(f"  cuda usable by knnclip._C: {usable}")
    for gpu in devices["gpus"] or ["(no NVIDIA GPU found)"]:
        lines.append(f"  {gpu}")
    return "\n".join(lines)
