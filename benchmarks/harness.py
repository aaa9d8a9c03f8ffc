"""What every benchmark script shares: paths, common arguments, the environment its figures
belong to, an atomic JSON write, and one markdown table.

Every results file written through :func:`write_results` carries an ``environment`` block
(date, commit, CPU model and instruction-set flags, Python and library versions, the command
line), which ``report.py`` prints above that file's tables in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DEFAULT_SCENARIO = ROOT / "simulations" / "hospitals-3.toml"

LIBRARIES = ("torch", "transformers", "peft", "flwr", "onnxruntime")
"""The libraries whose versions the figures depend on (a missing one is recorded as None)."""
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
"""The instruction-set flags that decide which kernels torch and onnxruntime pick."""


def add_json_argument(parser: argparse.ArgumentParser, name: str) -> None:
    """``--json``: where the results go (default ``benchmarks/results/<name>``)."""
    parser.add_argument("--json", default=str(RESULTS / name),
                        help=f"results file (default: benchmarks/results/{name})")


def add_scenario_arguments(parser: argparse.ArgumentParser, overrides_help: str) -> None:
    """``--scenario`` (default ``simulations/hospitals-3.toml``) and repeatable ``--set``."""
    parser.add_argument("--scenario", default=str(DEFAULT_SCENARIO))
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        help=overrides_help)


def cpu() -> tuple[str, list[str]]:
    """The CPU's model name and which of :data:`CPU_FLAGS` it has (from /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    return model, [f for f in CPU_FLAGS if f in flags]


def commit() -> str | None:
    """The checkout's commit (with ``-dirty`` when tracked files differ from it), or None."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    if not head:
        return None
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(argv: list[str] | None = None) -> dict[str, Any]:
    """The environment block: when, at which commit, on which CPU, with which libraries and by
    which command the figures were measured."""
    model, flags = cpu()
    argv = sys.argv if argv is None else argv
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit(), "cpu": model, "cpu_flags": flags, "cores": os.cpu_count(),
            "python": platform.python_version(),
            "versions": {name: version(name) for name in LIBRARIES},
            "command": " ".join(["python", *map(shlex.quote, argv)])}


def write_results(path: Path | str, results: Mapping[str, Any],
                  env: Mapping[str, Any] | None = None) -> None:
    """Write ``results`` with its environment block as indented JSON, atomically (a temporary
    file, then a rename). ``env`` defaults to :func:`environment` now."""
    from fed_llama.common.files import write_text_atomic

    data = {**results, "environment": dict(env) if env is not None else environment()}
    write_text_atomic(Path(path), json.dumps(data, indent=2) + "\n")


def markdown_table(rows: Iterable[Mapping[str, Any]], cols: list[str],
                   formats: Mapping[str, str | Callable[[Any], str]] | None = None) -> str:
    """A markdown table, one column per key in ``cols`` (a missing value is an empty cell).
    ``formats`` maps a column to a format string (``"{:.2f}"``) or a function."""
    formats = formats or {}

    def cell(row: Mapping[str, Any], col: str) -> str:
        if col not in row or row[col] is None:
            return ""
        fmt = formats.get(col, "{}")
        return fmt(row[col]) if callable(fmt) else fmt.format(row[col])

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(row, c) for c in cols) + " |" for row in rows]
    return "\n".join(lines)
