"""Reading the patches of one slide for the encoder: a torch Dataset and its DataLoader.

Each reader process opens its own OpenSlide handle; patches come back as uint8 (H, W, 3) tensors at
the encoder's input size, in tile order, with a status per patch (``OK``, ``BAD`` when its pixels
cannot be decoded, ``STAIN_SKIPPED`` when stain normalisation found no stain).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import torch
from torch.utils.data import DataLoader, Dataset

from preprocessing.features.patch_transforms import StainNormaliser, resize_patch, rgba_to_rgb

#: per-patch status returned by the loader
OK, BAD, STAIN_SKIPPED = 0, 1, 2


class PatchDataset(Dataset):
    """Patches of one slide as uint8 (H, W, 3) tensors at the encoder's input size.

    Each process opens its own OpenSlide handle on first use (handles must not cross a fork). A
    patch whose pixels cannot be decoded comes back blank with status ``BAD``; the handle is then
    reopened, since OpenSlide refuses all further reads on a handle after an error.
    """

    def __init__(self, slide: str | Path, coords: np.ndarray, level: int, read_size: int,
                 out_size: tuple[int, int], interpolation: str = "bicubic",
                 stain: StainNormaliser | None = None) -> None:
        self.slide = str(slide)
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.level = int(level)
        self.read_size = int(read_size)
        self.out_size = (int(out_size[0]), int(out_size[1]))
        self.interpolation = interpolation
        self.stain = stain
        self._handle: openslide.OpenSlide | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.coords)

    def _slide(self) -> openslide.OpenSlide:
        if self._handle is None or self._pid != os.getpid():
            self._handle = openslide.OpenSlide(self.slide)
            self._pid = os.getpid()
        return self._handle

    def _reset(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None

    def read(self, index: int) -> tuple[np.ndarray, int]:
        """One patch as uint8 RGB at the output size, and its status."""
        x, y = (int(v) for v in self.coords[index])
        try:
            region = self._slide().read_region((x, y), self.level, (self.read_size, self.read_size))
        except openslide.OpenSlideError:
            self._reset()
            return np.full((*self.out_size, 3), 255, np.uint8), BAD
        rgb = resize_patch(rgba_to_rgb(np.asarray(region)), self.out_size, self.interpolation)
        if self.stain is not None:
            rgb, normalised = self.stain(rgb)
            if not normalised:
                return rgb, STAIN_SKIPPED
        return rgb, OK

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        rgb, status = self.read(index)
        return torch.from_numpy(np.ascontiguousarray(rgb)), index, status


@contextlib.contextmanager
def single_threaded_opencv() -> Iterator[None]:
    """OpenCV on one thread while reader processes are forked, then as before.

    A forked child cannot use (or even resize) the thread pool of a parent that has used OpenCV in
    parallel: it deadlocks. With one thread OpenCV runs inline and has no pool to inherit.
    """
    import cv2

    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


#: size of the first batch: the model waits for it to be read, so it is kept small
FIRST_BATCH = 8


def batch_indices(n: int, batch_size: int, first: int = FIRST_BATCH) -> list[list[int]]:
    """Tile indices in order, cut into batches; the first one short so that the model starts early."""
    first = min(first, batch_size)
    cuts = [0, *range(first, n, batch_size), n] if n > first else [0, n]
    return [list(range(a, b)) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]


def reader_processes(n: int, batch_size: int, workers: int) -> int:
    """Worker processes worth starting: none when a single batch leaves nothing to overlap."""
    return workers if n > batch_size else 0


def make_loader(dataset: PatchDataset, batch_size: int, workers: int, pin_memory: bool,
                prefetch_batches: int = 4) -> DataLoader:
    """Batches in tile order; ``workers`` reader processes (0: read in this process)."""
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {"prefetch_factor": max(1, math.ceil(prefetch_batches / workers))}
    return DataLoader(dataset, batch_sampler=batch_indices(len(dataset), batch_size), num_workers=workers,
                      pin_memory=pin_memory, **extra)
