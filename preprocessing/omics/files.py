"""Read one delimited table file of the omics input and check its values, for every omics reader.

A table is ``.csv`` (comma-separated) or ``.tsv``/``.txt``/``.tab``/``.maf`` (tab-separated),
optionally compressed (``.zip`` holding one file, ``.gz``, ``.bz2``, ``.xz``). Leading ``#`` lines
(MAF version lines, cBioPortal headers) are skipped. Every problem is an :class:`InputError` naming
the file: missing, unreadable, damaged, empty, or holding non-numeric or infinite values where
numbers are expected.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from preprocessing.core.errors import InputError
from preprocessing.omics.barcodes import describe_rows

TABLE_EXTS = (".csv", ".tsv", ".txt", ".tab", ".maf")
COMPRESSION_EXTS = (".zip", ".gz", ".bz2", ".xz")


def base_name(path: Path) -> str:
    """Lower-case file name without a compression suffix."""
    name = path.name.lower()
    for ext in COMPRESSION_EXTS:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _open_text(path: Path) -> IO[str]:
    """Open a possibly compressed text file for reading lines."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rt", errors="replace")
    if name.endswith(".bz2"):
        return bz2.open(path, "rt", errors="replace")
    if name.endswith(".xz"):
        return lzma.open(path, "rt", errors="replace")
    if name.endswith(".zip"):
        archive = zipfile.ZipFile(path)
        members = [n for n in archive.namelist() if not n.endswith("/")]
        if len(members) != 1:
            raise InputError(path, f"a zipped table must hold exactly one file, found {len(members)}")
        return io.TextIOWrapper(archive.open(members[0]), errors="replace")
    return open(path, errors="replace")  # noqa: SIM115 - closed by the caller's with-block


def _leading_comment_lines(path: Path) -> int:
    """How many lines starting with '#' precede the header (MAF version lines, cBioPortal headers)."""
    count = 0
    try:
        with _open_text(path) as handle:
            for line in handle:
                if not line.startswith("#"):
                    break
                count += 1
    except (OSError, zipfile.BadZipFile, EOFError, lzma.LZMAError) as err:
        raise InputError(path, f"cannot read file: {err}") from err
    return count


def read_table(
    path: str | Path,
    usecols: Callable[[str], bool] | None = None,
    na_values: Iterable[str] | None = None,
    nrows: int | None = None,
) -> pd.DataFrame:
    """Read a delimited table (separator from the extension), skipping leading '#' lines.

    Raises InputError naming the file when it is missing, unreadable or holds no data rows.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    base = base_name(path)
    if not base.endswith(TABLE_EXTS):
        raise InputError(path, f"unknown table format: expected one of {', '.join(TABLE_EXTS)} "
                               f"(optionally {', '.join(COMPRESSION_EXTS)})")
    sep = "," if base.endswith(".csv") else "\t"
    skip = _leading_comment_lines(path)
    try:
        frame = pd.read_csv(path, sep=sep, skiprows=skip, usecols=usecols, na_values=na_values,
                            nrows=nrows, low_memory=False)
    except pd.errors.EmptyDataError as err:
        raise InputError(path, "empty table (no header)") from err
    except (EOFError, zlib.error, lzma.LZMAError) as err:  # a truncated or damaged .gz/.xz/.bz2 download
        raise InputError(path, f"damaged compressed file: {err}") from err
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise InputError(path, f"cannot parse table: {str(err).strip().splitlines()[0]}") from err
    if nrows != 0 and frame.empty:
        raise InputError(path, "empty table: a header but no data rows")
    return frame


def numeric_values(frame: pd.DataFrame, source: Path, what: str,
                   row_names: pd.Index | None = None) -> pd.DataFrame:
    """``frame`` as float64; InputError naming columns and rows that hold non-numeric or infinite
    values (``-Inf`` is what R writes for log2(0): left in, it would become a training mean of -inf
    and every held-out patient's value inf)."""
    text_cols = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if not text_cols:
        return _finite(frame.astype(np.float64), source, what, row_names)
    converted = frame[text_cols].apply(pd.to_numeric, errors="coerce")
    bad = converted.isna() & frame[text_cols].notna()
    if bad.to_numpy().any():
        cols = [c for c in text_cols if bad[c].any()]
        rows_mask = bad.any(axis=1).to_numpy()
        names = (row_names if row_names is not None else frame.index)[rows_mask]
        example = frame.loc[bad[cols[0]], cols[0]].iloc[0]
        raise InputError(source, f"non-numeric {what} (e.g. {example!r}) in column(s) {describe_rows(cols)}, "
                                 f"row(s) {describe_rows(names)}")
    out = frame.copy()
    out[text_cols] = converted
    return _finite(out.astype(np.float64), source, what, row_names)


def _finite(frame: pd.DataFrame, source: Path, what: str, row_names: pd.Index | None) -> pd.DataFrame:
    """``frame`` unchanged, or InputError naming the columns and rows that hold an infinite value."""
    infinite = np.isinf(frame.to_numpy())
    if infinite.any():
        cols = frame.columns[infinite.any(axis=0)]
        names = (row_names if row_names is not None else frame.index)[infinite.any(axis=1)]
        example = frame.to_numpy()[infinite][0]
        raise InputError(source, f"infinite {what} (e.g. {example}) in column(s) {describe_rows(cols)}, "
                                 f"row(s) {describe_rows(names)}: mark unmeasured values as empty or NA")
    return frame


def find_column(frame: pd.DataFrame, names: Iterable[str]) -> str | None:
    """First column equal to one of ``names`` (case-insensitive), else one ending in ``.name``."""
    names = list(names)
    lower = {str(c).lower(): c for c in frame.columns}
    for name in names:
        if name.lower() in lower:
            return lower[name.lower()]
    for name in names:
        for col in frame.columns:
            if str(col).lower().endswith("." + name.lower()):
                return col
    return None
