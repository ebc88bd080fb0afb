"""Atomic outputs: write under a temporary name beside the destination, rename when complete.

A killed job therefore never leaves a file or directory (e.g. a Zarr store) that looks finished.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from preprocessing.core.errors import InputError

log = logging.getLogger(__name__)


def temporary_sibling(dest: str | Path) -> Path:
    """A unique, hidden path in the same directory as ``dest`` (same filesystem, so rename is atomic)."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_path(path: str | Path) -> None:
    """Delete a file or a directory tree if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_stale_temporaries(dest: str | Path) -> None:
    """Delete the temporaries that killed writers left for ``dest`` (a glob pattern is allowed in its
    name); those of a writer that is still running are kept. The writer's pid is in the name."""
    dest = Path(dest)
    for path in dest.parent.glob(f".{dest.name}.tmp-*"):
        try:
            pid = int(path.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            log.info("removing %s left by an interrupted run", path)
            remove_path(path)
        except PermissionError:
            pass


def make_parent(dest: str | Path) -> None:
    """Create the folder ``dest`` goes in; an InputError naming ``dest`` when that is impossible (a
    file stands where a folder must be, no permission)."""
    try:
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocking = next((p for p in Path(dest).parents if p.exists() and not p.is_dir()), None)
        why = f"{blocking} is a file" if blocking else (err.strerror or str(err))
        raise InputError(dest, f"cannot create its folder: {why}") from None


def _check_replaceable(dest: Path, new: Path) -> None:
    """InputError unless ``new`` may replace ``dest``: a file replaces a file, and a folder replaces
    an empty folder or an earlier output of its kind (one that shares a top-level name with it, such
    as a Zarr store's ``zarr.json``). A mistyped ``-o`` must not delete a folder of other work."""
    if dest.is_symlink() or not dest.exists():
        return
    if new.is_dir() and not dest.is_dir():
        raise InputError(dest, "exists and is a file, not a folder; choose another output path")
    if dest.is_dir() and not new.is_dir():
        raise InputError(dest, "exists and is a folder; give the output a file name")
    if dest.is_dir():
        old_names = {p.name for p in dest.iterdir()}
        if old_names and not old_names & {p.name for p in new.iterdir()}:
            raise InputError(dest, "exists and holds other files, not an earlier output of this kind; "
                                   "choose another output path or remove it")


@contextlib.contextmanager
def atomic_output(dest: str | Path, create_folder: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``dest``, on any error it is removed.

    Works for files and for directories. An existing ``dest`` is only replaced once the new one is
    complete, and only by an output of its kind (see :func:`_check_replaceable`).
    ``create_folder=False`` writes only into a folder that exists (a cache folder that its owner may
    be removing must not be made again).
    """
    dest = Path(dest)
    if create_folder:
        make_parent(dest)
    tmp = temporary_sibling(dest)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"{dest}: writer produced nothing at {tmp}")
        _check_replaceable(dest, tmp)
        if dest.is_dir() and not dest.is_symlink():
            # rename() cannot replace a non-empty directory: move the old one aside first.
            old = temporary_sibling(dest)
            os.replace(dest, old)
            os.replace(tmp, dest)
            remove_path(old)
        else:
            os.replace(tmp, dest)
    except BaseException:
        remove_path(tmp)
        raise
