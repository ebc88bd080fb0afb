"""The tiles table: one row per kept patch, plus file-level metadata, in one Parquet file.

Columns: ``x``, ``y`` (level-0 pixels, top-left corner), ``tissue_fraction``. Metadata (a JSON dict
stored under the Parquet schema key ``healnet``): ``slide``, ``level``, ``downsample``,
``patch_size_level0``, ``patch_size``, ``target_mpp``, ``mpp``, ``mpp_source``, and, for a slide that
could not be read, ``failed`` (the reason). Zero rows is a valid table.

The workflow keeps one tiles folder per patch geometry (:func:`geometry_name`), so that encoders
trained at the same patch size and resolution share one tiling.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from preprocessing.core.atomic import atomic_output

META_KEY = b"healnet"
COLUMNS = {"x": "int64", "y": "int64", "tissue_fraction": "float32"}


def write_tiles(path: str | Path, tiles: pd.DataFrame, meta: dict[str, Any]) -> Path:
    """Write ``tiles`` (columns x, y, tissue_fraction) and ``meta`` atomically to ``path``."""
    frame = tiles.reindex(columns=list(COLUMNS)).astype(COLUMNS).reset_index(drop=True)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta)})
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_tiles(path: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a tiles file back as (table, metadata)."""
    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    return table.to_pandas(), meta


def invalid_positions(xy: np.ndarray) -> np.ndarray:
    """Rows of an N x 2 array of patch corners that are not whole, finite, non-negative level-0 pixels."""
    xy = np.asarray(xy, dtype=float)
    return ~np.isfinite(xy).all(axis=1) | (xy < 0).any(axis=1) | (xy != np.round(xy)).any(axis=1)


_GEOMETRY = re.compile(r"^(\d+)px_(\d+(?:\.\d+)?)mpp$")


def geometry_name(patch_size: int, mpp: float) -> str:
    """The folder name of a patch geometry, e.g. ``256px_0.5mpp`` (256 px at 0.5 µm per px)."""
    return f"{int(patch_size)}px_{float(mpp):g}mpp"


def parse_geometry(name: str) -> tuple[int, float]:
    """(patch size, µm per px) from :func:`geometry_name`'s text; ValueError for other text."""
    match = _GEOMETRY.match(name)
    if match is None:
        raise ValueError(f"not a patch geometry (like 256px_0.5mpp): {name!r}")
    return int(match[1]), float(match[2])
