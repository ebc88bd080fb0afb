"""Per-patient bags of patch features for a DataLoader: dataset, batch sampler, padding collate, loader.

A patient's bag is the concatenation of the patch features of its slides (their stores found by
:func:`healnet.data.stores.index_stores`). Bags are read lazily, one patient at a time, in the
DataLoader's worker processes (through the decoded-feature cache when there is one); during training
at most ``max_patches`` patches are drawn per bag (without replacement, seeded per epoch and patient),
at evaluation every patch is used. Batches pad bags to the longest one with a boolean token mask
(True = real patch). :mod:`healnet.data.resident` keeps bags in the training device's memory instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from healnet.data.stores import StoreReader
from preprocessing.core.errors import InputError
from preprocessing.features.store import SlideStore


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
        self.reader = StoreReader(cache_dir)

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
                f, c = self.reader.read(store.path, rows)
                feats.append(f)
                coords.append(c)
            offset += store.n
        if len(feats) == 1:
            return feats[0], coords[0]
        return np.concatenate(feats), np.concatenate(coords)

    @property
    def cache_dir(self) -> Path | None:
        """The decoded-feature cache this dataset reads through (None: none, or given up)."""
        return self.reader.cache_dir

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
        pad_into(bags_in, wsi.numpy(), coords.numpy(), mask)
        out.update(wsi=wsi, coords=coords, wsi_mask=mask)
    return out


def pad_into(bags: Sequence[tuple[Any, Any] | None], wsi: Any, coords: Any, mask: torch.Tensor) -> None:
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
