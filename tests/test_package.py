"""The app package (FAB) that ``flwr run .`` builds and sends to the SuperLink and every
SuperNode holds only what the apps import: the ``fed_llama`` package and the scenarios a
``flwr run .`` may name, never tests, benchmarks, docs, kits or earlier packages."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_app_package_holds_only_the_import_package_and_the_scenarios() -> None:
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(ROOT)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    extra = [n for n in names if not (
        n in ("pyproject.toml", ".info/CONTENT")
        or (n.startswith("fed_llama/") and n.endswith(".py"))
        or (n.startswith("simulations/") and n.count("/") == 1 and n.endswith(".toml")))]
    assert extra == []
    assert "fed_llama/server/app.py" in names and "fed_llama/client/app.py" in names
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "fed_llama").rglob("*.py")}
    assert sources <= set(names)  # every module the apps may import is there
    assert "simulations/hospitals-3.toml" in names  # the run config's default scenario
    # Flower refuses packages over 10 MB; the code alone is well under 1 MB
    assert len(fab) < 1_000_000
