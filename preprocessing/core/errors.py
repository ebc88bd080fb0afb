"""The one exception type that the command line turns into a one-line message and exit status 1."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad user input (a file, a table, a config value): the message names the thing and the reason.

    Raise it where the cause is known, e.g. ``InputError(path, "no MPP in metadata and no default")``;
    the CLI prints ``<path>: <reason>`` on one line and exits non-zero.
    """

    def __init__(self, source: str | Path, reason: str) -> None:
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


def one_line(err: BaseException) -> str:
    """``Type: message`` of a caught exception, its line breaks and runs of spaces collapsed, for the
    reason of an :class:`InputError` (library messages often span lines)."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"
