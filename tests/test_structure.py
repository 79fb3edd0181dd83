"""The project's layering, checked on the source: no import circle, no stage importing another, core
importing nothing above it, no file over the size rule.

Every import statement counts, wherever it stands (module level, inside a function, under
``TYPE_CHECKING``): a lazy import is still a dependency, and a circle through one is still a circle.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "sft", "dpo", "rlhf", "evaluation", "scripts", "bench")
MAX_LINES = 450  # the developers' guide: no file over ~450 lines


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """{dotted module name: file} for every module of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def imported_names(path: Path) -> set[str]:
    """Every module name an import statement in ``path`` names (``from a import b`` names ``a`` and ``a.b``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """{module: the project modules it imports}."""
    return {name: {target for target in imported_names(path) if target in modules and target != name}
            for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted; [] when acyclic."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def stage_packages() -> set[str]:
    """The packages that hold a training stage: those of the registered stages' entry modules."""
    from core.stages import registered_stages

    return {module.split(".")[0] for info in registered_stages() for module in info.entry_modules.values()}


# --------------------------------------------------------------------------- the checker itself


def test_the_circle_finder_finds_a_circle_and_only_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_imports_are_found_at_any_depth(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from evaluation.run import X\n"
                      "def f():\n    import core.training\n    from core import log\n")
    assert {"evaluation.run", "evaluation.run.X", "core.training", "core", "core.log"} <= imported_names(source)


# --------------------------------------------------------------------------- the project


def test_no_import_circle():
    assert circles(import_graph(project_modules())) == []


def test_no_stage_imports_another():
    packages = stage_packages()
    assert packages == {"sft", "dpo", "rlhf"}  # the registry names the stages' packages
    graph = import_graph(project_modules())
    crossings = sorted(f"{module} -> {target}" for module, targets in graph.items() for target in targets
                       if module.split(".")[0] in packages and target.split(".")[0] in packages - {module.split(".")[0]})
    assert crossings == []


def test_core_imports_nothing_above_it():
    graph = import_graph(project_modules())
    above = sorted(f"{module} -> {target}" for module, targets in graph.items() if module.startswith("core")
                   for target in targets if target.split(".")[0] != "core")
    assert above == []


def test_no_source_file_over_the_size_rule():
    sizes = {str(path.relative_to(ROOT)): len(path.read_text(encoding="utf-8").splitlines())
             for path in project_modules().values()}
    assert {name: lines for name, lines in sizes.items() if lines > MAX_LINES} == {}
