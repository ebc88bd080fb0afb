"""The command line: subcommands listed, bad input reported on one line; outputs appear atomically."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from healnet.cli import SUBCOMMANDS
from preprocessing.core.atomic import atomic_output
from preprocessing.core.errors import InputError


def healnet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "healnet.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_help_lists_every_step() -> None:
    run = healnet("--help")
    assert run.returncode == 0
    for name in ["demo", "tile", "extract", "omics", "train", "evaluate", "report"]:
        assert name in SUBCOMMANDS and f"  {name}" in run.stdout


def test_unknown_command_fails() -> None:
    run = healnet("tiel")
    assert run.returncode == 2 and "unknown command 'tiel'" in run.stderr


def test_bad_input_is_one_line_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.svs"
    run = healnet("tile", str(missing), "-o", str(tmp_path / "t.parquet"))
    assert run.returncode == 1
    lines = [line for line in run.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and str(missing) in lines[0]
    assert not (tmp_path / "t.parquet").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "t.parquet"  # its folder cannot be made: a file has that name
    with pytest.raises(InputError, match=f"{out}: cannot create its folder: {blocker} is a file"), \
            atomic_output(out):
        pass


def test_atomic_file_and_directory(tmp_path: Path) -> None:
    dest = tmp_path / "out.txt"
    with atomic_output(dest) as tmp:
        tmp.write_text("one")
        assert not dest.exists()
    assert dest.read_text() == "one"

    with pytest.raises(RuntimeError), atomic_output(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert dest.read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]

    store = tmp_path / "s.zarr"
    for content in ["a", "b"]:
        with atomic_output(store) as tmp:
            tmp.mkdir()
            (tmp / "x").write_text(content)
    assert (store / "x").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt", "s.zarr"]


def test_an_output_never_replaces_other_work(tmp_path: Path) -> None:
    # a mistyped -o: a folder of other files, or a file where a store goes, is left as it is
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="is a folder"), atomic_output(work) as tmp:
        tmp.write_text("tiles")
    with pytest.raises(InputError, match="holds other files"), atomic_output(work) as tmp:
        tmp.mkdir()
        (tmp / "zarr.json").write_text("{}")
    assert [p.name for p in work.iterdir()] == ["notes.txt"]
    table = tmp_path / "table.parquet"
    table.write_text("keep")
    with pytest.raises(InputError, match="is a file"), atomic_output(table) as tmp:
        tmp.mkdir()
    assert table.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.parquet", "work"]
    # an empty folder may be filled
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    with atomic_output(empty) as tmp:
        tmp.mkdir()
        (tmp / "zarr.json").write_text("{}")
    assert (empty / "zarr.json").exists()
