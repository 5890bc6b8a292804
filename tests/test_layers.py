"""The layers import one way (README, Layout): modules -> ops -> kernels | cuda | native -> reference, nothing circles.

Every import statement of the package's source is read with ``ast`` (module level and inside functions: a lazy
import is still a dependency), resolved to a module of the package, and checked against the layer rules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# installed name -> source folder (pyproject's package-dir)
SOURCES = {"mome": ROOT / "mome", "mome.kernels": ROOT / "kernels", "mome.benchmarks": ROOT / "benchmarks"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imports(name: str, path: Path) -> set[str]:
    """The package's modules that ``name`` imports (``from a import b`` counts as ``a.b`` when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = _package_of(name, path).split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import mome.ops.attention` reaches that module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}

# layer -> the layers it may import (its own always). Order of the prefixes matters: the longest match wins.
LAYERS = {
    "mome.kernels": {"mome.kernels"},
    "mome.reference": {"mome.reference"},
    "mome.native": {"mome.native", "mome.reference"},  # the spec's helpers, and its launchers for what it declines
    "mome.cuda": {"mome.cuda"},
    "mome.settings": set(),
    "mome.ops": {"mome.ops", "mome.kernels", "mome.reference", "mome.native", "mome.cuda", "mome.settings"},
    "mome.nn": {"mome.nn", "mome.ops", "mome.settings"},
    "mome.models": {"mome.models", "mome.nn", "mome.ops", "mome.settings"},
    "mome.integrations": {"mome.integrations", "mome.nn", "mome.ops", "mome.settings"},
}


def _layer(module: str) -> str | None:
    matches = [layer for layer in LAYERS if module == layer or module.startswith(layer + ".")]
    return max(matches, key=len) if matches else None


def test_the_walk_sees_the_package():
    assert {"mome.ops.attention", "mome.kernels.attention", "mome.reference.attention"} <= set(MODULES)
    assert "mome.ops._backend" in GRAPH["mome.ops.attention"]


@pytest.mark.parametrize("module", sorted(name for name in MODULES if _layer(name)))
def test_each_layer_imports_only_the_layers_below_it(module):
    allowed = LAYERS[_layer(module)]
    wrong = sorted(t for t in GRAPH[module] if t != "mome" and _layer(t) not in allowed)
    assert not wrong, f"{module} ({_layer(module)}) imports {wrong}; it may import {sorted(allowed)}"


def test_kernels_import_only_their_helpers_and_each_other():
    for module in (name for name in MODULES if name.startswith("mome.kernels.")):
        outside = sorted(t for t in GRAPH[module] if not t.startswith("mome.kernels"))
        assert not outside, f"{module} imports {outside}"
        text = MODULES[module].read_text()
        assert "mome.ops" not in text and "mome.reference" not in text, f"{module} names an upper layer"


def _cycles() -> list[list[str]]:
    """Every import circle, each found once from its first module (Tarjan's strongly connected components)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
            if target == _package_of(node, MODULES[node]) or node.startswith(target + "."):
                continue  # a module's own package __init__ runs first anyway: not a circle of the code
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    return components


def test_no_import_circles():
    circles = _cycles()
    assert not circles, f"import circles: {circles}"
