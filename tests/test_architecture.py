"""The package graph: the layer order docs/architecture.md documents, and no import circle."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fed_llama"


def documented_layers() -> dict[str, int]:
    """``package -> layer`` from the numbered list under "## Layer order"."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Layer order", 1)[1].split("\n## ", 1)[0]
    layers: dict[str, int] = {}
    for line in section.splitlines():
        m = re.match(r"(\d+)\. (.*)", line)
        if m:
            for name in re.findall(r"`(\w+)`", m.group(2)):
                layers[name] = int(m.group(1))
    return layers


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, *, top_level_only: bool) -> set[str]:
    """The fed_llama modules ``path`` imports (``from X import Y`` counts X, and X.Y when Y is
    a module of ours)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fed_llama")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fed_llama"):
            assert node.module is not None
            found.add(node.module)
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if (ROOT / Path(*sub.split("."))).is_dir() or (
                        ROOT / Path(*sub.split("."))).with_suffix(".py").is_file():
                    found.add(sub)
    return found


METHOD_CONFIG = re.compile(r"fed_llama\.adapter\.methods\.\w+\.config")
"""An adapter method's settings (stdlib only): part of the config layer, where the scenario
and train configs parse them (docs/architecture.md says so)."""


def package_of(module: str) -> str:
    if METHOD_CONFIG.fullmatch(module):
        return "config"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_package_has_a_documented_layer() -> None:
    layers = documented_layers()
    packages = {package_of(module_name(p)) for p in SOURCES} - {""}
    assert packages <= set(layers), sorted(packages - set(layers))


def test_imports_only_go_down_the_documented_layers() -> None:
    layers = documented_layers()
    layers[""] = 1  # fed_llama/__init__.py: the version
    wrong = []
    for path in SOURCES:
        here = module_name(path)
        for target in imports(path, top_level_only=False):
            a, b = package_of(here), package_of(target)
            if a != b and layers[b] >= layers[a]:
                wrong.append(f"{here} -> {target} (layer {layers[a]} -> {layers[b]})")
    assert not wrong, "\n".join(wrong)


def test_the_method_configs_are_the_config_layers_and_import_nothing_above_it() -> None:
    layers = documented_layers()
    configs = [p for p in SOURCES if METHOD_CONFIG.fullmatch(module_name(p))]
    assert len(configs) == 3  # V1, V2, Excitor: LoRA's LoraConfig is in fed_llama/config
    for path in configs:
        for target in imports(path, top_level_only=False):
            assert layers[package_of(target)] <= layers["config"], (path, target)
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert "fed_llama.adapter.methods.<method>.config" in text


def test_the_client_and_the_server_never_import_each_other() -> None:
    for path in SOURCES:
        here = package_of(module_name(path))
        if here in ("client", "server"):
            other = "server" if here == "client" else "client"
            assert not [t for t in imports(path, top_level_only=False)
                        if package_of(t) == other], path


def test_no_module_imports_one_that_imports_it_back() -> None:
    """Module-level imports only: what runs when Flower loads the two apps at once."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in SOURCES:
        graph[module_name(path)] |= imports(path, top_level_only=True)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in list(graph):
        if node not in index:
            visit(node)
    # a package importing its own submodules in __init__ is not a circle
    cycles = [c for c in cycles if not all(m == c[0] or m.startswith(c[0] + ".") for m in c)]
    assert not cycles, cycles


def test_the_flwr_run_apps_module_imports_nothing_heavy() -> None:
    import subprocess
    import sys

    code = ("import sys, fed_llama.launch.flwr_run; "
            "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
            "sys.exit(f'imported {heavy}' if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
