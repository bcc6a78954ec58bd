"""The import graph of the product packages: layers point one way and no modules import each other in a circle.

Every `import` statement counts, also those inside functions and under `if TYPE_CHECKING:`: a lazy import is
still a dependency, and a type-only cycle still means two modules must be understood together.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("minimind", "models", "engine", "server", "training", "evaluation", "webui")

# package -> the packages it may import. Everything else is an upward or sideways import.
ALLOWED: dict[str, set[str]] = {
    # The base error type lives here; the `minimind` dispatcher reaches the subcommands by name only
    # (importlib on the SUBCOMMANDS table), so it imports nothing statically.
    "minimind": set(),
    "models": {"minimind"},
    "engine": {"models", "minimind"},
    "server": {"engine", "models", "minimind"},
    # training -> engine: RL rollouts (training/rollout.py, grpo.py) and distillation data
    # (training/distill_data.py, data_cli.py) generate text in process with the engine.
    "training": {"models", "engine", "minimind"},
    "evaluation": {"engine", "models", "minimind"},
    # The web UI speaks only HTTP to the server.
    "webui": set(),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The product modules `name` imports (the longest known prefix of each imported name)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            parts = target.split(".")
            for end in range(len(parts), 0, -1):
                candidate = ".".join(parts[:end])
                if candidate in known:
                    if candidate != name:
                        found.add(candidate)
                    break
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _package(module: str) -> str:
    return module.split(".")[0]


def test_the_walk_sees_the_known_edges():
    """The checks below are only as good as the walk: it must see lazy, from- and package-level imports."""
    graph = _graph()
    assert "models.model" in graph["engine.model_runner"]
    assert "engine.llm" in graph["training.rollout"]  # imported inside a method
    assert "models.cli.convert" not in graph["minimind.cli"]  # reached by name only


def test_no_package_imports_upward_or_sideways():
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if _package(target) != _package(module) and _package(target) not in ALLOWED[_package(module)]
    )
    assert not wrong, "imports against the layering (see ALLOWED):\n" + "\n".join(wrong)


def test_no_cycle_between_packages():
    graph = _graph()
    packages = {pkg: set() for pkg in PACKAGES}
    for module, targets in graph.items():
        packages[_package(module)] |= {_package(t) for t in targets} - {_package(module)}
    assert _cycles(packages) == []


# training is left out: its stage registry (training/stages.py stage_classes) imports the stage modules, which
# import the Stage base class from it, by design of that registry.
@pytest.mark.parametrize("package", [p for p in PACKAGES if p != "training"])
def test_no_cycle_between_modules_inside_a_package(package):
    graph = _graph()
    inside = {m: {t for t in ts if _package(t) == package} for m, ts in graph.items() if _package(m) == package}
    # A package's __init__ re-exporting its modules is not a cycle of meaning; leave it out.
    inside = {m: ts - {package} for m, ts in inside.items() if m != package}
    assert _cycles(inside) == []


def test_every_subcommand_names_a_module_that_exists():
    from minimind.cli import SUBCOMMANDS

    for name, (module, _) in SUBCOMMANDS.items():
        assert importlib.util.find_spec(module) is not None, f"minimind {name}: no module {module}"
