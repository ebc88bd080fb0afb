"""Bags kept in the training device's memory (``training.bags_on_device``): :class:`ResidentBags`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from healnet.data.bags import (
    BagBatchSampler,
    BagDataset,
    checked_batches,
    collate_bags,
    make_loader,
    pad_into,
    patch_pick,
)


class ResidentBags:
    """The bags of some patients read once, every patch, and kept in one device's memory (GPU memory
    on a GPU, RAM on CPU): ``training.bags_on_device``.

    A training batch is then cut from that memory instead of being read, padded and handed through
    shared and pinned memory at every epoch; on a fast GPU that hand-over, not the model, bounds
    training however many readers decode the stores. :meth:`collate` draws the same
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
        itemsize = stores[0].dtype.itemsize
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
            pad_into(bags, wsi, coords, mask)
            out.update(wsi=wsi, coords=coords, wsi_mask=mask)
        return out
