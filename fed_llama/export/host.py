"""The host a speed was measured on: its CPU and how busy it was.

Decode and prefill speeds describe the export host at the moment of measuring (a busy host
halves them), not the model; the manifest, the printed line and the device README say so
next to every figure. Nothing here imports more than the standard library.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def export_host() -> dict[str, Any]:
    """The CPU the speeds were measured on, the cores this process may use and the
    1-minute load average right after measuring (from ``/proc/cpuinfo`` and the kernel)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                cpu = value.strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        load: float | None = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        load = None
    return {"cpu": cpu, "cores": cores, "load-1min": load}


def host_label(host: dict[str, Any]) -> str:
    """``on <cpu>, load 1.9 over 2 cores``: what a speed figure must be read with."""
    load = host.get("load-1min")
    busy = f"load {load:.1f}" if load is not None else "load not known"
    return f"on {host.get('cpu')}, {busy} over {host.get('cores')} cores"
