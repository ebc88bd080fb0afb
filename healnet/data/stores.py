"""A cohort's feature stores as training sees them: which stores each patient has, and their patches.

The store format itself (and its checks and reader) belongs to :mod:`preprocessing.features.store`.
Here: :func:`index_stores` finds and checks each patient's stores (``FEATURES_DIR/{stem}.zarr``), and
:class:`StoreReader` reads their patches in one process, straight from Zarr or through the
decoded-feature cache (``training.feature_cache``): a store's chunks are decoded once per training job
and kept as uncompressed ``.npy`` files that later reads memory-map, so that drawing patches from a
bag costs no decoding, however large the bag.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from preprocessing.core.atomic import atomic_output
from preprocessing.core.errors import InputError
from preprocessing.features.store import SlideStore, open_store, read_store

log = logging.getLogger(__name__)


def index_stores(
    features_dir: str | Path | None, manifest: pd.DataFrame
) -> tuple[dict[str, list[SlideStore]], int | None]:
    """Per patient, the non-empty feature stores of its slides; and the common feature dim (None: none).

    A slide listed in the manifest without a store is logged and skipped; stores with N = 0 contribute
    nothing. Different feature dims across stores are an InputError.
    """
    bags: dict[str, list[SlideStore]] = {}
    dims: dict[int, Path] = {}
    folder = Path(features_dir) if features_dir else None
    n_missing = 0
    for patient, slides in manifest["slides"].items():
        stores = []
        for stem in slides:
            path = folder / f"{stem}.zarr" if folder else None
            if path is None or not path.exists():
                n_missing += 1
                continue
            store = open_store(path)
            dims.setdefault(store.dim, store.path)
            if store.n > 0:
                stores.append(store)
        if stores:
            bags[str(patient)] = stores
    if n_missing:
        log.warning("%d slide(s) listed in the manifest have no feature store in %s", n_missing, folder)
    if len(dims) > 1:
        a, b = list(dims.items())[:2]
        raise InputError(b[1], f"feature dim {b[0]} differs from {a[0]} in {a[1]}")
    return bags, (next(iter(dims)) if dims else None)


class StoreReader:
    """Patch features and coords of checked stores, read in one process: from the Zarr store (its open
    arrays kept per path), or, with ``cache_dir``, through the decoded-feature cache there."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        self.cache_dir = cache_dir
        self._arrays: dict[Path, tuple[Any, Any]] = {}
        self._decoded: dict[Path, tuple[np.ndarray, np.ndarray]] = {}

    def read(self, path: Path, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(features in stored precision, coords float32) of every patch of a store, or of ``rows``."""
        decoded = self._decoded_store(path) if self.cache_dir is not None else None
        if decoded is None:
            return read_store(path, rows, self._arrays)
        return decoded if rows is None else (decoded[0][rows], decoded[1][rows])

    def _decoded_store(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """A store's features and coords memory-mapped from the decoded cache, decoded and written
        there on first use (by whichever reader process comes first: the files appear by atomic
        rename, so a concurrent reader sees a whole file or none). When the cache cannot be written
        (a full disk, say), the arrays just decoded are returned once and this process stops using
        the cache."""
        if path in self._decoded:
            return self._decoded[path]
        assert self.cache_dir is not None
        stem = self.cache_dir / hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24]
        files = (stem.with_suffix(".features.npy"), stem.with_suffix(".coords.npy"))
        try:
            arrays = tuple(np.load(f, mmap_mode="r") for f in files)
        except (OSError, ValueError):
            features, coords = read_store(path, None, self._arrays)
            try:
                for file, array in zip(files, (features, coords), strict=True):
                    with atomic_output(file, create_folder=False) as tmp, open(tmp, "wb") as handle:
                        np.save(handle, np.ascontiguousarray(array))
                arrays = tuple(np.load(f, mmap_mode="r") for f in files)
            except (OSError, ValueError) as err:
                log.warning("decoded-feature cache %s not used from here on: %s", self.cache_dir, err)
                self.cache_dir = None
                return features, coords
        self._decoded[path] = (arrays[0], arrays[1])
        return self._decoded[path]
