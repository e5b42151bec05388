"""What the CPU benchmarks record about the machine they ran on (shared by ``bench_peers.py`` and
``retraction_ablation.py``): its CPU model and its load (Linux pressure stall information)."""
from __future__ import annotations

import platform
from pathlib import Path


def cpu_pressure_psi() -> tuple[float, float] | None:
    """``(avg10 %, total us)`` of /proc/pressure/cpu's ``some`` line (time with a runnable task
    waiting for a CPU), None where the kernel has no PSI."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        kv = dict(f.split("=") for f in line.split()[1:])
        return float(kv["avg10"]), float(kv["total"])
    except (OSError, KeyError, ValueError, IndexError):
        return None


def cpu_model() -> str:
    """The ``model name`` of /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
