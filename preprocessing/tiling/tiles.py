"""The tiles table: one row per kept patch, plus file-level metadata, in one Parquet file.

Columns: ``x``, ``y`` (level-0 pixels, top-left corner), ``tissue_fraction``. Metadata (a JSON dict
stored under the Parquet schema key ``healnet``): ``slide``, ``level``, ``downsample``,
``patch_size_level0``, ``patch_size``, ``target_mpp``, ``mpp``, ``mpp_source``, and, for a slide that
could not be read, ``failed`` (the reason). Zero rows is a valid table.
"""

from __future__ import annotations

import json
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
