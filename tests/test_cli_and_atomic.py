"""The command line: subcommands listed, bad input reported on one line; outputs appear atomically."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import Ran, assert_one_line_error, run_healnet_process

from healnet.cli import SUBCOMMANDS
from preprocessing.core.atomic import atomic_output
from preprocessing.core.errors import InputError


def test_help_lists_every_step() -> None:
    run = run_healnet_process("--help")
    assert run.returncode == 0
    for name in ["demo", "tile", "extract", "omics", "train", "evaluate", "report"]:
        assert name in SUBCOMMANDS and f"  {name}" in run.stdout


def test_unknown_command_fails() -> None:
    run = run_healnet_process("tiel")
    assert run.returncode == 2 and "unknown command 'tiel'" in run.stderr


def test_bad_input_is_one_line_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.svs"
    run = run_healnet_process("tile", missing, "-o", tmp_path / "t.parquet")
    # a fresh process logs to stderr (e.g. numexpr's thread count): those records aside, one line
    assert_one_line_error(run, "no such file", command="tile", source=missing, status=1)
    assert not (tmp_path / "t.parquet").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "t.parquet"  # its folder cannot be made: a file has that name
    with pytest.raises(InputError) as raised, atomic_output(out):
        pass
    assert_one_line_error(raised, f"cannot create its folder: {blocker} is a file", source=out)


LOG = "2026-01-02 03:04:05,678 healnet tile INFO: NumExpr defaulting to 2 threads.\n"
ERROR = "healnet tile: error: /data/x.svs: no such file\n"


@pytest.mark.parametrize("stderr", [
    "Traceback (most recent call last):\n" + ERROR,  # anything before the line that is not a log record
    ERROR + ERROR,  # two errors
    ERROR.replace("file\n", "file\n  (a second line of reason)\n"),
    LOG.replace("INFO", "ERROR") + ERROR,  # the error logged as well as printed
    "",  # nothing said
    ERROR.replace("healnet tile: error: ", ""),  # not the command's error line
    ERROR.replace("healnet tile", "healnet extract"),  # another command's
    ERROR.replace("/data/x.svs", "/data/y.svs"),  # another source
    ERROR.replace("no such file", "unreadable"),  # another reason
])
def test_the_one_line_error_contract_refuses(stderr: str) -> None:
    with pytest.raises(AssertionError):
        assert_one_line_error(Ran(1, "", stderr), "no such file", command="tile", source="/data/x.svs")


def test_the_one_line_error_contract_accepts_log_records_before_the_line() -> None:
    line = assert_one_line_error(Ran(1, "", LOG + LOG + ERROR), "no such file", command="tile",
                                 source="/data/x.svs", status=1)
    assert line == ERROR.strip()
    with pytest.raises(AssertionError):  # a bad input must not exit 0
        assert_one_line_error(Ran(0, "", ERROR))
    with pytest.raises(AssertionError):
        assert_one_line_error(Ran(2, "", ERROR), status=1)
    assert_one_line_error(ERROR, command="tile")  # stderr alone: a recorded error, exit status aside
    with pytest.raises(AssertionError):  # a raised error's message is held to the same line
        assert_one_line_error(InputError("/data/x.svs", "no such\nfile"))


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
    with pytest.raises(InputError) as raised, atomic_output(work) as tmp:
        tmp.write_text("tiles")
    assert_one_line_error(raised, "is a folder", source=work)
    with pytest.raises(InputError) as raised, atomic_output(work) as tmp:
        tmp.mkdir()
        (tmp / "zarr.json").write_text("{}")
    assert_one_line_error(raised, "holds other files", source=work)
    assert [p.name for p in work.iterdir()] == ["notes.txt"]
    table = tmp_path / "table.parquet"
    table.write_text("keep")
    with pytest.raises(InputError) as raised, atomic_output(table) as tmp:
        tmp.mkdir()
    assert_one_line_error(raised, "is a file", source=table)
    assert table.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.parquet", "work"]
    # an empty folder may be filled
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    with atomic_output(empty) as tmp:
        tmp.mkdir()
        (tmp / "zarr.json").write_text("{}")
    assert (empty / "zarr.json").exists()
