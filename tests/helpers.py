"""Assertions and runners shared by the test modules.

A bad input must end a ``healnet`` command with exactly one line on stderr,
``healnet <command>: error: <source>: <reason>``, and a non-zero exit status; a library function
raises :class:`InputError` whose message is that line's ``<source>: <reason>`` part.
:func:`assert_one_line_error` checks all of that in one place.

The helper's contract on logging: ``healnet`` sends its log records to stderr, so a command run in
a subprocess may print records (``<date> <time> healnet <command> <LEVEL>: ...``) before its
error. Those lines, one-line records in the command's own format, are set aside; everything else on
stderr must be the single error line. A traceback, a library's warning or a multi-line record is
not a log line of that form and fails the assertion. In-process runs (:func:`run_healnet`) see no
log records at all: pytest's log capture holds them, so there the whole stderr is the one line.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from healnet.cli import main as healnet_main
from preprocessing.core.errors import InputError

REPO = Path(__file__).resolve().parents[1]
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} healnet \S+ (DEBUG|INFO|WARNING): ")
ERROR_LINE = re.compile(r"^healnet (?P<command>\S+): error: (?P<message>\S.*)$")


@dataclass(frozen=True)
class Ran:
    """What a ``healnet`` command did: its exit status and what it printed."""

    returncode: int
    stdout: str
    stderr: str


def run_healnet(capsys: pytest.CaptureFixture[str], *args: str | Path) -> Ran:
    """Run ``healnet <args>`` in this process (through ``healnet.cli.main``), capturing its output."""
    capsys.readouterr()  # what earlier steps of the test printed is not this command's
    status = healnet_main([str(a) for a in args])
    out = capsys.readouterr()
    return Ran(status, out.out, out.err)


def run_healnet_process(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m healnet.cli <args>`` in a fresh process, as a user or a Snakemake job would."""
    return subprocess.run([sys.executable, "-m", "healnet.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _check_message(message: str, fragments: tuple[str | Path, ...], source: str | Path | None) -> None:
    """``<source>: <reason>`` on one line, with every fragment in it."""
    assert message == message.strip() and "\n" not in message and "\r" not in message, \
        f"error is not one line: {message!r}"
    assert ": " in message, f"error names no source: {message!r}"
    if source is not None:
        assert message.startswith(f"{source}: "), f"error does not start with {source}: {message!r}"
    for fragment in fragments:
        assert str(fragment) in message, f"{str(fragment)!r} not in the error {message!r}"


def assert_one_line_error(result: Ran | subprocess.CompletedProcess | str | BaseException
                          | pytest.ExceptionInfo, *fragments: str | Path, command: str | None = None,
                          source: str | Path | None = None, status: int | None = None) -> str:
    """Require a one-line bad-input error holding every fragment; return that line (or message).

    ``result`` is a command's outcome (:class:`Ran` or a ``CompletedProcess``: its exit status must
    be non-zero, or ``status`` when given, and its stderr the one error line, log records aside),
    its stderr text alone (a command that records an error and goes on, exit status checked by the
    caller), or a raised :class:`InputError` (directly or as ``pytest.raises``' info: its message is
    checked as the ``<source>: <reason>`` part of the line). ``command`` is the subcommand the line
    must name; ``source`` what the message must start with.
    """
    if isinstance(result, pytest.ExceptionInfo):
        result = result.value
    if isinstance(result, BaseException):
        assert isinstance(result, InputError), f"not an InputError: {result!r}"
        message = str(result)
        _check_message(message, fragments, source)
        return message
    if isinstance(result, str):
        stderr = result
    else:
        stderr = result.stderr
        if status is None:
            assert result.returncode != 0, f"exit status 0 for a bad input; stderr: {stderr!r}"
        else:
            assert result.returncode == status, f"exit status {result.returncode}, not {status}: {stderr!r}"
    lines = [line for line in stderr.splitlines() if not LOG_RECORD.match(line)]
    assert len(lines) == 1 and stderr.endswith("\n"), f"stderr is not one error line: {stderr!r}"
    match = ERROR_LINE.match(lines[0])
    assert match, f"not a 'healnet <command>: error: <source>: <reason>' line: {lines[0]!r}"
    if command is not None:
        assert match["command"] == command, f"error names command {match['command']!r}, not {command!r}"
    _check_message(match["message"], fragments, source)
    return lines[0]


@contextmanager
def raises_one_line_error(*fragments: str | Path, match: str | None = None,
                          source: str | Path | None = None) -> Iterator[pytest.ExceptionInfo[InputError]]:
    """``pytest.raises(InputError, match=...)`` that also holds the error to
    :func:`assert_one_line_error` (one line, naming its source, every fragment in it)."""
    with pytest.raises(InputError, match=match) as raised:
        yield raised
    assert_one_line_error(raised, *fragments, source=source)
