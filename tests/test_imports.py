"""The project's modules import each other without cycles, and ``preprocessing`` stands without
``healnet``: read from the source with ``ast``, imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("healnet", "preprocessing")


def module_name(path: Path, root: Path) -> str:
    """``healnet/training/cv.py`` -> ``healnet.training.cv``; a package's ``__init__`` is the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path = REPO) -> dict[str, Path]:
    """Every module of the project's packages, by dotted name."""
    return {module_name(p, root): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}


def imported_names(path: Path, name: str) -> set[str]:
    """Every dotted name the module imports, at any depth of its code (relative imports resolved);
    ``from a import b`` yields both ``a`` and ``a.b`` (``b`` may be a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join([*base, node.module] if node.module else base)
            else:
                stem = node.module or ""
            found.add(stem)
            found.update(f"{stem}.{alias.name}" for alias in node.names)
    return found


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """module -> the project modules it imports. Importing ``a.b.c`` runs ``a`` and ``a.b`` first,
    so those count as imported too (a package's ``__init__`` is part of every import under it)."""
    modules = project_modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_names(path, name):
            parts = imported.split(".")
            targets.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        graph[name] = {t for t in targets & modules.keys() if t != name and not name.startswith(f"{t}.")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_graph_sees_every_module_and_its_imports() -> None:
    graph = import_graph()
    assert "healnet.cli" in graph and "preprocessing.core.errors" in graph
    assert "preprocessing.core.errors" in graph["healnet.cli"]  # a top-level import
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_the_projects_modules() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_preprocessing_never_imports_healnet() -> None:
    graph = import_graph()
    upward = sorted(f"{name} imports {target}" for name, targets in graph.items()
                    if name.startswith("preprocessing") for target in targets if target.startswith("healnet"))
    assert not upward, "preprocessing imports healnet: " + "; ".join(upward)
