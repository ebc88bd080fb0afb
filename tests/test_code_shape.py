"""Every function in ``healnet/`` and ``preprocessing/`` is at most 80 lines and every module at
most 500, measured by ``benchmarks/code_shape.py`` (which prints the longest of each)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_code_shape() -> ModuleType:
    """``benchmarks/code_shape.py`` imported by its path (``benchmarks`` is not a package)."""
    spec = importlib.util.spec_from_file_location("code_shape", REPO / "benchmarks" / "code_shape.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shape = load_code_shape()


def test_the_measure_counts_every_function_and_module() -> None:
    functions = dict((name, n) for n, name in shape.function_lengths(REPO))
    assert functions["healnet/cli.py:main"] > 10  # a known function, measured by its own lines
    modules = dict((name, n) for n, name in shape.module_lengths(REPO))
    assert modules["healnet/cli.py"] == len((REPO / "healnet" / "cli.py").read_text().splitlines())


def test_no_function_longer_than_the_limit() -> None:
    long = [f"{name} ({n} lines)" for n, name in shape.function_lengths(REPO) if n > shape.MAX_FUNCTION_LINES]
    assert not long, f"functions over {shape.MAX_FUNCTION_LINES} lines: " + ", ".join(long)


def test_no_module_longer_than_the_limit() -> None:
    long = [f"{name} ({n} lines)" for n, name in shape.module_lengths(REPO) if n > shape.MAX_MODULE_LINES]
    assert not long, f"modules over {shape.MAX_MODULE_LINES} lines: " + ", ".join(long)
