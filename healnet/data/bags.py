"""Model inputs: the omics folder of a cohort, WSI feature stores, and per-patient bags for a DataLoader.

A patient's bag is the concatenation of the patch features of its slides (``FEATURES_DIR/{stem}.zarr``,
arrays ``features`` N x D and ``coords`` N x 2). Bags are read lazily, one patient at a time, in the
DataLoader's worker processes; during training at most ``max_patches`` patches are drawn per bag
(without replacement, seeded per epoch and patient), at evaluation every patch is used. Batches pad
bags to the longest one with a boolean token mask (True = real patch).

With a decoded-feature cache (``training.feature_cache``), a store's chunks are decoded once per
training job and kept as uncompressed ``.npy`` files that later reads memory-map: drawing patches
from a bag then costs no decoding, however large the bag.

With ``training.bags_on_device`` (:class:`ResidentBags`), a training job reads its bags once into the
training device's memory and cuts every later batch there, with the same patch draws and padding.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import zarr
from torch.utils.data import DataLoader, Dataset, get_worker_info

from preprocessing.core.atomic import atomic_output
from preprocessing.core.errors import InputError, one_line

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("patient", "time", "event", "slides", "has_wsi", "has_omics")
SPLIT_COLUMNS = ("fold", "patient", "role")


@dataclass
class OmicsTables:
    """The three tables of an omics folder (``manifest`` indexed by patient, in file order)."""

    manifest: pd.DataFrame
    features: pd.DataFrame
    splits: pd.DataFrame


def _read_parquet(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(path, "missing (expected from `healnet omics`)")
    try:
        return pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - any reader failure is a bad input file
        raise InputError(path, f"cannot read Parquet: {err}") from err


def _slide_list(value: Any) -> list[str]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        return [value] if value else []
    return [str(v) for v in value]


def load_omics_dir(omics_dir: str | Path) -> OmicsTables:
    """Read and check ``manifest.parquet``, ``features.parquet`` and ``splits.parquet``."""
    omics_dir = Path(omics_dir)
    if not omics_dir.is_dir():
        raise InputError(omics_dir, "omics folder does not exist")
    manifest = _read_parquet(omics_dir / "manifest.parquet")
    features = _read_parquet(omics_dir / "features.parquet")
    splits = _read_parquet(omics_dir / "splits.parquet")
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise InputError(omics_dir / "manifest.parquet", f"missing columns {missing}")
    if manifest["patient"].duplicated().any():
        dup = manifest.loc[manifest["patient"].duplicated(), "patient"].iloc[0]
        raise InputError(omics_dir / "manifest.parquet", f"patient {dup} appears more than once")
    manifest = manifest.assign(
        patient=manifest["patient"].astype(str),
        time=pd.to_numeric(manifest["time"], errors="coerce").astype(float),
        event=pd.to_numeric(manifest["event"], errors="coerce"),
        slides=manifest["slides"].map(_slide_list),
        has_wsi=manifest["has_wsi"].astype(bool),
        has_omics=manifest["has_omics"].astype(bool),
    ).set_index("patient", drop=False)
    bad = manifest["time"].isna() | (manifest["time"] < 0) | ~manifest["event"].isin([0, 1])
    if bad.any():
        raise InputError(
            omics_dir / "manifest.parquet",
            f"patient {manifest.index[bad][0]}: time must be >= 0 and event 0 or 1",
        )
    manifest["event"] = manifest["event"].astype(int)
    if "patient" in features.columns:
        features = features.set_index("patient")
    features.index = features.index.astype(str)
    features.index.name = "patient"
    non_numeric = [c for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if non_numeric:
        raise InputError(omics_dir / "features.parquet", f"non-numeric columns {non_numeric[:5]}")
    infinite = np.isinf(features.to_numpy(dtype=float))  # NaN is a missing value, imputed per fold
    if infinite.any():
        row, col = np.argwhere(infinite)[0]
        first = f"{features.columns[col]} of patient {features.index[row]}"
        raise InputError(omics_dir / "features.parquet",
                         f"{int(infinite.sum())} infinite value(s), first {first}")
    missing = [c for c in SPLIT_COLUMNS if c not in splits.columns]
    if missing:
        raise InputError(omics_dir / "splits.parquet", f"missing columns {missing}")
    splits = splits.assign(patient=splits["patient"].astype(str), role=splits["role"].astype(str))
    if not set(splits["role"]) <= {"train", "val"}:
        raise InputError(
            omics_dir / "splits.parquet", f"role must be train or val, got {sorted(set(splits['role']))}"
        )
    return OmicsTables(manifest, features.astype(np.float32), splits)


@dataclass(frozen=True)
class SlideStore:
    """One slide's feature store: path, number of patches, feature dim."""

    path: Path
    n: int
    dim: int


def open_store(path: Path) -> SlideStore:
    """Open a store's metadata; InputError if it is unreadable, unfinished or malformed, each with
    the same advice as a store whose chunks no longer decode."""
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
    # zarr reads a missing chunk as zeros: a store cut short by a copy would train on blank patches.
    # Extraction writes every chunk (write_empty_chunks; before that, a whole chunk of all-zero
    # embeddings, which no pretrained encoder gives, would have been left unwritten).
    if feats.nchunks_initialized < feats.nchunks:
        missing = feats.nchunks - feats.nchunks_initialized
        raise InputError(path, f"{missing} of {feats.nchunks} feature chunks are missing (a partial copy?); "
                               f"{REEXTRACT}")
    return SlideStore(Path(path), int(feats.shape[0]), int(feats.shape[1]))


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


REEXTRACT = "delete the store and rerun extraction"


def damaged_store(path: Path, err: Exception) -> InputError:
    """The one-line error for a feature store that exists but cannot be read, and how to recover."""
    return InputError(path, f"cannot read its patch features ({one_line(err)}); {REEXTRACT}")


def read_store(
    path: Path, rows: np.ndarray | None = None, opened: dict[Path, tuple[Any, Any]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One store's patch features (stored precision) and coords (float32): every patch, or ``rows``.

    The one reader of patch features, for training, scoring and the report's heatmaps. ``opened``
    caches the open arrays per path (a dataset reads the same stores every epoch). Any failure to
    read a store that exists is the one-line :func:`damaged_store` error.
    """
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


def patch_pick(total: int, max_patches: int | None, seed: int) -> np.ndarray | None:
    """Sorted positions of the patches drawn from a bag of ``total`` with ``seed``; None: every patch
    (``seed < 0``, no cap, or a bag within the cap)."""
    if seed >= 0 and max_patches is not None and total > max_patches:
        return np.sort(np.random.default_rng(seed).choice(total, max_patches, replace=False))
    return None


class BagDataset(Dataset):
    """Per-patient model inputs; items are fetched with keys ``(row, seed)``.

    ``seed >= 0`` draws at most ``max_patches`` patches with that seed; ``seed < 0`` returns every
    patch. Rows index the arrays given here (one row per patient).
    """

    def __init__(
        self,
        omics: np.ndarray,
        has_omics: np.ndarray,
        bags: Sequence[Sequence[SlideStore]],
        bins: np.ndarray,
        events: np.ndarray,
        times: np.ndarray,
        max_patches: int | None = None,
        read_wsi: bool = True,
        cache_dir: Path | None = None,
    ) -> None:
        self.omics = np.ascontiguousarray(omics, dtype=np.float32)
        self.has_omics = np.asarray(has_omics, dtype=bool)
        self.bags = [list(b) for b in bags]
        self.has_wsi = np.array([len(b) > 0 for b in self.bags], dtype=bool)
        self.bins = np.asarray(bins, dtype=np.int64)
        self.events = np.asarray(events, dtype=np.float32)
        self.times = np.asarray(times, dtype=np.float32)
        self.max_patches = max_patches
        self.read_wsi = read_wsi
        self.cache_dir = cache_dir
        self._arrays: dict[Path, tuple[Any, Any]] = {}
        self._decoded: dict[Path, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.bins)

    def read_bag(self, row: int, seed: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """(features ``[n, D]`` in stored precision, coords ``[n, 2]`` float32) of one patient."""
        stores = self.bags[row]
        pick = patch_pick(sum(s.n for s in stores), self.max_patches, seed)
        feats, coords = [], []
        offset = 0
        for store in stores:
            rows = None if pick is None else pick[(pick >= offset) & (pick < offset + store.n)] - offset
            if rows is None or len(rows):
                decoded = self._decoded_store(store.path) if self.cache_dir is not None else None
                if decoded is None:
                    f, c = read_store(store.path, rows, self._arrays)
                else:
                    f, c = decoded if rows is None else (decoded[0][rows], decoded[1][rows])
                feats.append(f)
                coords.append(c)
            offset += store.n
        if len(feats) == 1:
            return feats[0], coords[0]
        return np.concatenate(feats), np.concatenate(coords)

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

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        row, seed = key if isinstance(key, tuple) else (key, -1)
        item = self.fields(row)
        if self.read_wsi and self.has_wsi[row]:
            try:
                item["wsi"], item["coords"] = self.read_bag(row, seed)
            except InputError as err:  # raised by checked_batches in the main process
                item["error"] = (err.source, err.reason)
        return item

    def fields(self, row: int) -> dict[str, Any]:
        """One patient's item without its bag (``wsi`` and ``coords`` None)."""
        return {
            "row": row,
            "omics": self.omics[row],
            "has_omics": self.has_omics[row],
            "has_wsi": self.has_wsi[row] and self.read_wsi,
            "bin": self.bins[row],
            "event": self.events[row],
            "time": self.times[row],
            "wsi": None,
            "coords": None,
            "error": None,
        }


class BagBatchSampler:
    """Batches of ``(row, seed)`` keys: seeded shuffling per epoch and a per-patient sampling seed.

    Keys are made in the main process, so persistent workers need no epoch state and a run is
    reproducible for a given ``seed`` and epoch. ``sample=False`` (evaluation) asks for all patches.
    """

    def __init__(self, rows: Sequence[int], batch_size: int, shuffle: bool, seed: int, sample: bool) -> None:
        self.rows = np.asarray(rows, dtype=int)
        self.batch_size, self.shuffle, self.seed, self.sample = batch_size, shuffle, seed, sample
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order and patch draws the next iteration yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        rows = rng.permutation(self.rows) if self.shuffle else self.rows
        seeds = rng.integers(0, 2**31 - 1, size=len(rows)) if self.sample else np.full(len(rows), -1)
        for start in range(0, len(rows), self.batch_size):
            stop = start + self.batch_size
            yield [(int(r), int(s)) for r, s in zip(rows[start:stop], seeds[start:stop], strict=True)]

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)


def collate_bags(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of items; bags padded to the longest (``wsi`` None when no item has patches)."""
    out: dict[str, Any] = {
        "row": torch.tensor([it["row"] for it in items]),
        "omics": torch.from_numpy(np.stack([it["omics"] for it in items])),
        "has_omics": torch.tensor([bool(it["has_omics"]) for it in items]),
        "has_wsi": torch.tensor([bool(it["has_wsi"]) for it in items]),
        "bin": torch.tensor([int(it["bin"]) for it in items]),
        "event": torch.tensor([float(it["event"]) for it in items]),
        "time": torch.tensor([float(it["time"]) for it in items]),
        "errors": [it["error"] for it in items if it["error"]],
        "wsi": None,
        "wsi_mask": None,
        "coords": None,
    }
    bags = [it["wsi"] for it in items]
    longest = max((len(b) for b in bags if b is not None), default=0)
    if longest:
        dim = next(b.shape[1] for b in bags if b is not None)
        dtype = torch.from_numpy(np.empty(0, next(b.dtype for b in bags if b is not None))).dtype
        wsi = _batch_buffer((len(items), longest, dim), dtype)
        coords = _batch_buffer((len(items), longest, 2), torch.float32)
        mask = torch.zeros((len(items), longest), dtype=torch.bool)
        bags_in = [None if it["wsi"] is None else (it["wsi"], it["coords"]) for it in items]
        _pad_into(bags_in, wsi.numpy(), coords.numpy(), mask)
        out.update(wsi=wsi, coords=coords, wsi_mask=mask)
    return out


def _pad_into(bags: Sequence[tuple[Any, Any] | None], wsi: Any, coords: Any, mask: torch.Tensor) -> None:
    """Copy bag ``i`` (features, coords) into row ``i`` of uninitialised padded arrays (numpy arrays
    or tensors alike), zeros after it, and mark its patches in the all-False ``mask``."""
    for i, bag in enumerate(bags):
        n = 0 if bag is None else len(bag[0])
        if n:
            wsi[i, :n], coords[i, :n], mask[i, :n] = bag[0], bag[1], True
        wsi[i, n:], coords[i, n:] = 0, 0


def _batch_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for a padded batch; in a loader worker, in shared memory.

    A worker hands its batch to the training process through shared memory: a tensor made
    elsewhere is first copied there, which for a batch of 8 bags x 4,096 patches x 1,280 float16
    features (84 MB) cost about as much as reading the bags. torch's own default collate allocates
    in shared memory for the same reason.
    """
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.empty((0,), dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes)).view(shape)


def checked_batches(loader: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The batches of ``loader``; a bag that could not be read stops the run with its store named.

    Readers put the failure into the batch instead of raising it: an exception raised in a worker
    process reaches the main process as a multi-line traceback, not as the one-line error a damaged
    store deserves.
    """
    for batch in loader:
        if batch["errors"]:
            source, reason = batch["errors"][0]
            raise InputError(source, reason)
        yield batch


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def make_loader(
    dataset: BagDataset, sampler: BagBatchSampler, workers: int, pin_memory: bool = False
) -> DataLoader:
    """A DataLoader whose worker processes read and pad bags ahead of the training step.

    No workers are used when the dataset reads no WSI (omic vectors are already in memory). The
    loader draws its workers' base seed from a private generator, never torch's global one: each new
    iterator takes a draw, and a loader without persistent workers makes one per epoch, so with the
    global generator the dropout masks (and the c-index) would depend on the number of workers.
    """
    workers = workers if dataset.read_wsi and dataset.has_wsi.any() else 0
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {"persistent_workers": True, "prefetch_factor": 4, "worker_init_fn": _worker_init}
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_bags,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
        **extra,
    )


class ResidentBags:
    """The bags of some patients read once, every patch, and kept in one device's memory (GPU memory
    on a GPU, RAM on CPU): ``training.bags_on_device``.

    A training batch is then cut from that memory instead of being read, padded and handed through
    shared and pinned memory at every epoch; on an H200 that hand-over capped HEALNet at about
    150-170 patients/s however many readers decoded the stores. :meth:`collate` draws the same
    patches (:func:`patch_pick`) and pads them as :func:`collate_bags` does, so a model learns the
    same numbers either way.
    """

    def __init__(self, dataset: BagDataset, rows: Sequence[int], device: torch.device, workers: int) -> None:
        started = time.perf_counter()
        self.dataset, self.device = dataset, device
        self.features: dict[int, torch.Tensor] = {}
        self.coords: dict[int, torch.Tensor] = {}
        with_wsi = [int(r) for r in rows if dataset.read_wsi and dataset.has_wsi[r]]
        sampler = BagBatchSampler(with_wsi, 1, shuffle=False, seed=0, sample=False)
        for batch in checked_batches(make_loader(dataset, sampler, workers)):
            row, n = int(batch["row"][0]), int(batch["wsi_mask"][0].sum())
            # copy=True: on CPU .to() would keep a view of the reader's shared-memory batch, which
            # holds open file descriptors (two per kept bag: a 500-patient fold hits the usual 1,024)
            self.features[row] = batch["wsi"][0, :n].to(device, copy=True)
            self.coords[row] = batch["coords"][0, :n].to(device, copy=True)
        self.load_seconds = time.perf_counter() - started

    @staticmethod
    def nbytes(dataset: BagDataset, rows: Sequence[int]) -> int:
        """Bytes the bags of ``rows`` take in memory (features in stored precision, float32 coords)."""
        stores = [s for r in rows if dataset.read_wsi for s in dataset.bags[int(r)]]
        if not stores:
            return 0
        itemsize = zarr.open_group(str(stores[0].path), mode="r")["features"].dtype.itemsize
        return sum(s.n * (s.dim * itemsize + 2 * 4) for s in stores)

    def collate(self, keys: Sequence[tuple[int, int]]) -> dict[str, Any]:
        """The batch :func:`collate_bags` makes for ``keys`` (``(row, seed)``), its bags on the device."""
        out = collate_bags([self.dataset.fields(int(row)) for row, _ in keys])  # every field but the bags
        bags: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for row, seed in keys:
            features, coords = self.features.get(int(row)), self.coords.get(int(row))
            pick = None if features is None else patch_pick(len(features), self.dataset.max_patches, seed)
            if pick is not None:
                index = torch.as_tensor(pick, device=self.device)
                features, coords = features[index], coords[index]
            bags.append(None if features is None else (features, coords))
        longest = max((len(b[0]) for b in bags if b is not None), default=0)
        if longest:
            dim, dtype = next((b[0].shape[1], b[0].dtype) for b in bags if b is not None)
            wsi = torch.empty((len(keys), longest, dim), dtype=dtype, device=self.device)
            coords = torch.empty((len(keys), longest, 2), dtype=torch.float32, device=self.device)
            mask = torch.zeros((len(keys), longest), dtype=torch.bool, device=self.device)
            _pad_into(bags, wsi, coords, mask)
            out.update(wsi=wsi, coords=coords, wsi_mask=mask)
        return out
