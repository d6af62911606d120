"""What the CPU computes natively, where that decides which precision is worth running.

bfloat16 is fast only where the CPU has it in hardware (AVX-512 BF16, or AMX). Elsewhere
libraries emulate it, correctly but slower than float32 (torch's autocast to bf16 ran 7.3x slower
than fp32 on an AVX2-only EPYC), so a bf16 run there measures the emulation, not the model.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # as Linux names them in /proc/cpuinfo
BF16_OVERRIDE = "KNNCLIP_CPU_BF16"  # "0": act as on a CPU without bf16 (to see what such a CPU does)


def cpu_flags() -> frozenset[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_missing() -> str | None:
    """None where this CPU has bfloat16 arithmetic in hardware, else why not, in one sentence."""
    if os.environ.get(BF16_OVERRIDE) == "0":
        return f"{BF16_OVERRIDE}=0 treats this CPU as one without bfloat16 arithmetic"
    flags = cpu_flags()
    if any(flag in flags for flag in BF16_FLAGS):
        return None
    if not flags:
        return f"the CPU's features cannot be read here ({platform.system()} {platform.machine()}); bf16 is not assumed"
    return "this CPU has no bfloat16 arithmetic (no AVX-512 BF16, no AMX): bf16 would be emulated, slower than fp32"
