"""The feature store of one slide: a Zarr v3 group, its one writer, validity check and reader.

Layout: array ``features`` (N x D, float16 or float32, one row per patch) and array ``coords``
(N x 2 int64, level-0 pixels of each patch's top-left corner, same row order), plus attributes that
say how the features were made (encoder, weights, tiles, ``n_patches``, ...). ``complete: true`` is
the last attribute written: a reader trusts nothing without it. A store is written under a temporary
name and appears under its own only when whole (:func:`create_store`), so a killed job never leaves
one that looks done.

Extraction (:mod:`preprocessing.features.extract`) writes stores; training, scoring and the report
check them with :func:`open_store` and read them with :func:`read_store`.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from preprocessing.core.atomic import atomic_output
from preprocessing.core.errors import InputError, one_line

#: rows per chunk of ``features``: a typical bag (a few thousand patches) is one or two chunk reads.
CHUNK_ROWS = 4096
#: the advice given with every error about a store that exists but cannot be used
REEXTRACT = "delete the store and rerun extraction"
#: attributes that must match for an existing complete store to be reused
REUSE_KEYS = ("encoder", "weights", "weights_sha256", "dtype", "n_tiles", "tiles_sha256", "stain_norm",
              "level", "downsample", "patch_size_level0", "target_mpp", "patch_size")


# ---------------------------------------------------------------------------------------------
# writing


class RowWriter:
    """Append rows to a 2-D Zarr array one whole chunk at a time (each chunk is written once)."""

    def __init__(self, array: zarr.Array, chunk_rows: int) -> None:
        self.array = array
        self.chunk_rows = chunk_rows
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.written = 0

    def append(self, rows: np.ndarray) -> None:
        """Queue ``rows``; every chunk they fill is written now."""
        if rows.shape[1:] != self.array.shape[1:]:  # zarr would silently keep only the first columns
            raise RuntimeError(f"feature rows of shape {rows.shape[1:]} for a store of "
                               f"{self.array.shape[1:]}")
        self.buffer.append(rows)
        self.buffered += len(rows)
        if self.buffered >= self.chunk_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self.buffer:
            return
        rows = np.concatenate(self.buffer)
        take = len(rows) if final else (len(rows) // self.chunk_rows) * self.chunk_rows
        if take:
            self.array[self.written:self.written + take] = rows[:take]
            self.written += take
        self.buffer = [rows[take:]] if take < len(rows) else []
        self.buffered = len(rows) - take

    def close(self) -> int:
        """Write what is left; returns the number of rows written."""
        self._flush(final=True)
        return self.written


class StoreWriter:
    """A store being written (see :func:`create_store`): feature rows first, then coords and attributes."""

    def __init__(self, folder: Path, n_rows: int, dim: int, dtype: str | np.dtype) -> None:
        self.group = zarr.open_group(str(folder), mode="w", zarr_format=3)
        rows = max(1, min(n_rows, CHUNK_ROWS))
        # every chunk on disk, all-zero ones too: a reader takes a missing chunk as damage, not zeros
        self.features = self.group.create_array("features", shape=(n_rows, dim), chunks=(rows, dim),
                                                dtype=np.dtype(dtype), config={"write_empty_chunks": True})
        self.rows = RowWriter(self.features, rows)
        self.finished = False

    def finish(self, coords: np.ndarray, attrs: dict[str, Any]) -> None:
        """Close the feature rows, write ``coords`` (one row per feature row) and ``attrs``, and mark
        the store complete, the very last write."""
        n = self.rows.close()
        if n != self.features.shape[0]:
            self.features.resize((n, self.features.shape[1]))
        self.group.create_array("coords", data=coords, chunks=(max(1, min(len(coords), CHUNK_ROWS)), 2))
        self.group.attrs.update(attrs)
        self.group.attrs["complete"] = True
        self.finished = True


@contextlib.contextmanager
def create_store(out: str | Path, n_rows: int, dim: int, dtype: str | np.dtype) -> Iterator[StoreWriter]:
    """A new store with room for ``n_rows`` feature rows of ``dim``, written under a temporary name.

    It replaces ``out`` when the block ends after :meth:`StoreWriter.finish`; on an error nothing
    appears under ``out``.
    """
    with atomic_output(Path(out)) as tmp:
        writer = StoreWriter(tmp, n_rows, dim, dtype)
        yield writer
        if not writer.finished:
            raise RuntimeError(f"{out}: store closed before its coords and attributes were written")


def write_store(out: str | Path, features: np.ndarray, coords: np.ndarray, attrs: dict[str, Any]) -> None:
    """Write a whole store from arrays in memory (``n_patches`` is set from them)."""
    features = np.asarray(features)
    with create_store(out, len(features), features.shape[1], features.dtype) as store:
        if len(features):
            store.rows.append(features)
        store.finish(np.asarray(coords, dtype=np.int64).reshape(-1, 2), {**attrs, "n_patches": len(features)})


def tiles_fingerprint(coords: np.ndarray) -> str:
    """sha256 of the tile coordinates (int64, row order): a rerun with other tiles is not reused."""
    return hashlib.sha256(np.ascontiguousarray(coords, dtype=np.int64).tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# opening and checking


@dataclass(frozen=True)
class SlideStore:
    """One slide's checked feature store: path, number of patches, feature dim and dtype."""

    path: Path
    n: int
    dim: int
    dtype: np.dtype


def open_store(path: str | Path) -> SlideStore:
    """Open and check a store; InputError if it is unreadable, unfinished or malformed, each with the
    same advice as a store whose chunks no longer decode."""
    path = Path(path)
    try:
        group = zarr.open_group(str(path), mode="r")
        feats, coords = group["features"], group["coords"]
    except Exception as err:  # noqa: BLE001 - any failure to open means a bad store
        raise InputError(path, f"not a readable feature store ({one_line(err)}); {REEXTRACT}") from err
    if group.attrs.get("complete") is not True:
        raise InputError(
            path, f"feature store is not marked complete (interrupted extraction?); {REEXTRACT}"
        )
    if feats.ndim != 2 or coords.ndim != 2 or coords.shape != (feats.shape[0], 2):
        raise InputError(
            path,
            f"expected features N x D and coords N x 2, got {feats.shape} and {coords.shape}; {REEXTRACT}",
        )
    if group.attrs.get("n_patches") != feats.shape[0]:
        raise InputError(path, f"says n_patches {group.attrs.get('n_patches')} but holds {feats.shape[0]} "
                               f"rows; {REEXTRACT}")
    # zarr reads a missing chunk as zeros: a store cut short by a copy would train on blank patches.
    # The writer puts every chunk on disk (write_empty_chunks), all-zero ones included.
    if feats.nchunks_initialized < feats.nchunks:
        missing = feats.nchunks - feats.nchunks_initialized
        raise InputError(path, f"{missing} of {feats.nchunks} feature chunks are missing (a partial copy?); "
                               f"{REEXTRACT}")
    return SlideStore(path, int(feats.shape[0]), int(feats.shape[1]), np.dtype(feats.dtype))


def is_complete(path: str | Path) -> bool:
    """True when ``path`` is a store that :func:`open_store` accepts (its writer finished)."""
    try:
        open_store(path)
    except InputError:
        return False
    return True


def reusable(path: str | Path, expected: dict[str, Any]) -> bool:
    """True when ``path`` is a complete store made the way ``expected`` describes (:data:`REUSE_KEYS`):
    the same tiles, encoder, weights, dtype and stain normalisation."""
    if not is_complete(path):
        return False
    attrs = store_attrs(path)
    return all(attrs.get(key) == expected.get(key) for key in REUSE_KEYS)


def damaged_store(path: Path, err: Exception) -> InputError:
    """The one-line error for a feature store that exists but cannot be read, and how to recover."""
    return InputError(path, f"cannot read its patch features ({one_line(err)}); {REEXTRACT}")


# ---------------------------------------------------------------------------------------------
# reading


def store_attrs(path: str | Path) -> dict[str, Any]:
    """A store's attributes (how its features were made; ``failed`` when extraction recorded why it
    has no patches); the :func:`damaged_store` error when it cannot be opened."""
    try:
        return dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception as err:  # noqa: BLE001 - any failure here is a damaged store
        raise damaged_store(Path(path), err) from err


def read_store(
    path: str | Path, rows: np.ndarray | None = None, opened: dict[Path, tuple[Any, Any]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One store's patch features (stored precision) and coords (float32): every patch, or ``rows``.

    The one reader of patch features, for training, scoring and the report's heatmaps; check the
    store first with :func:`open_store`. ``opened`` caches the open arrays per path (a dataset reads
    the same stores every epoch). Any failure to read a store that exists is the one-line
    :func:`damaged_store` error.
    """
    path = Path(path)
    try:
        arrays = opened.get(path) if opened is not None else None
        if arrays is None:
            group = zarr.open_group(str(path), mode="r")
            arrays = (group["features"], group["coords"])
            if opened is not None:
                opened[path] = arrays
        features, coords = arrays
        if rows is None:
            return np.asarray(features[:]), np.asarray(coords[:], dtype=np.float32)
        return np.asarray(features.oindex[rows, :]), np.asarray(coords.oindex[rows, :], dtype=np.float32)
    except Exception as err:  # noqa: BLE001 - any failure here is a damaged store
        raise damaged_store(path, err) from err
