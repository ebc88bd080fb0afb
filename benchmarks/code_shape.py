"""Print the longest functions and modules of the project's packages.

The codebase keeps every function in ``healnet/`` and ``preprocessing/`` at most 80 lines long and
every module at most 500 lines; ``tests/test_code_shape.py`` holds it to that.

    python benchmarks/code_shape.py [--top N]
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("healnet", "preprocessing")
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500


def modules(root: Path = ROOT) -> list[Path]:
    """Every Python module of the packages."""
    return sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py"))


def module_lengths(root: Path = ROOT) -> list[tuple[int, str]]:
    """(lines, path) of every module, longest first."""
    rows = [(len(p.read_text().splitlines()), str(p.relative_to(root))) for p in modules(root)]
    return sorted(rows, reverse=True)


def function_lengths(root: Path = ROOT) -> list[tuple[int, str]]:
    """(lines, path:qualified name) of every function and method, decorators included, longest first."""
    rows = []
    for path in modules(root):
        tree = ast.parse(path.read_text())
        stack: list[tuple[ast.AST, str]] = [(tree, "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    name = f"{prefix}{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                        rows.append((child.end_lineno - first + 1, f"{path.relative_to(root)}:{name}"))
                    stack.append((child, f"{name}."))
    return sorted(rows, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args()
    print(f"longest modules (limit {MAX_MODULE_LINES} lines):")
    for n, name in module_lengths()[: args.top]:
        print(f"  {n:5d}  {name}")
    print(f"longest functions (limit {MAX_FUNCTION_LINES} lines):")
    for n, name in function_lengths()[: args.top]:
        print(f"  {n:5d}  {name}")


if __name__ == "__main__":
    main()
