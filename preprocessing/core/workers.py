"""How many reader processes a job starts: the ``workers: auto`` rule that extraction and training share.

On a GPU, reading bounds both steps: one reader process decodes patches or feature bags far more
slowly than the GPU consumes them. So ``auto`` gives a GPU job all of its threads but one, which
feeds the GPU. On CPU the model needs the cores itself, and ``auto`` gives one reader.
"""

from __future__ import annotations

import argparse

from preprocessing.core.errors import InputError

AUTO = "auto"


def resolve_workers(setting: int | str, device_type: str, threads: int) -> int:
    """A ``workers`` setting (a number, or ``auto``) as a number of reader processes on a ``cuda`` or
    ``cpu`` device with ``threads`` cores; anything else is an InputError naming ``--workers``."""
    if setting == AUTO:
        return max(1, threads - 1) if device_type == "cuda" else 1
    if not isinstance(setting, int) or setting < 0:
        raise InputError("--workers", f"must be 0 or more, or auto, got {setting!r}")
    return setting


def workers_argument(value: str) -> int | str:
    """argparse type of ``--workers``: a number of processes, or ``auto``."""
    if value == AUTO:
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of processes nor auto: {value!r}") from None
