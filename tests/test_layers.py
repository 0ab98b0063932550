"""The package's layers (docs/architecture.md): every import inside ``s2d2`` goes down, never up or sideways, and
no module imports itself back through others. Imports are read from the source (function-level ones included), so
a lazy import cannot hide an upward dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import s2d2

PACKAGE = Path(s2d2.__file__).parent

# Lowest first. A module may import its own package (a folder's modules work together) and any lower layer; two
# packages in one layer may not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("s2d2.errors",),
    ("s2d2.files",),
    ("s2d2.config", "s2d2.transfer"),
    ("s2d2.core", "s2d2.models"),
    ("s2d2.checkpoint",),
    ("s2d2.families",),
    ("s2d2.engine",),
    ("s2d2.api",),
    ("s2d2.evaluation", "s2d2.serve", "s2d2.hf"),
    ("s2d2.training",),
    ("s2d2.cli", "s2d2.lm_eval", "s2d2"),  # the package itself: the public API, imported by no module inside
    ("s2d2.__main__",),
]


def _unit(module: str) -> tuple[int, str]:
    """The (layer index, unit name) of a module: the longest unit name that is the module or a package above it."""
    best: tuple[int, str] | None = None
    for rank, units in enumerate(LAYERS):
        for unit in units:
            if (module == unit or module.startswith(unit + ".")) and (best is None or len(unit) > len(best[1])):
                best = (rank, unit)
    if best is None:
        raise AssertionError(f"module {module} is in no layer: add it to LAYERS and docs/architecture.md")
    return best


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The ``s2d2`` modules that ``path`` imports (``from s2d2.x import y`` counts as s2d2.x.y when that is a
    module, else s2d2.x)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up from the module's package
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(n for n in names if n == "s2d2" or n.startswith("s2d2."))
    found.discard(module)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        targets = set()
        for target in _imports(path, name, known):
            while target not in known:  # an attribute of a module: the module
                target = target.rpartition(".")[0]
            targets.add(target)
        graph[name] = targets
    return graph


def test_every_module_is_in_a_layer() -> None:
    for module in _modules():
        _unit(module)


def test_imports_go_down() -> None:
    wrong = []
    for module, targets in _graph().items():
        rank, unit = _unit(module)
        for target in sorted(targets):
            t_rank, t_unit = _unit(target)
            if t_unit != unit and t_rank >= rank:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that do not go down a layer:\n" + "\n".join(wrong)


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_check_sees_upward_and_lazy_imports(tmp_path: Path) -> None:
    """The walker finds a function-level import, and the layer rule refuses core importing the engine."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from s2d2.engine import runner\n    import s2d2.api\n")
    found = _imports(path, "s2d2.core.m", set(_modules()))
    assert found == {"s2d2.engine.runner", "s2d2.api"}
    assert _unit("s2d2.engine.runner")[0] > _unit("s2d2.core.loop")[0]
