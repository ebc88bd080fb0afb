"""Reading the patches of one slide for the encoder: a torch Dataset and its DataLoader.

Patches come back as uint8 (H, W, 3) tensors at the encoder's input size, in tile order, with a
status per patch: ``OK``, ``BAD`` when its pixels cannot be decoded, and the flags ``STAIN_SKIPPED``
(stain normalisation found no stain) and ``FELL_BACK`` (a damaged tile made the tile reader hand the
patch to OpenSlide). The reader (``auto``, ``tiles``, ``gpu``, ``openslide``): ``tiles`` decodes the
slide's JPEG tiles once each at the resolution the encoder needs (:mod:`preprocessing.slides.jpeg_tiles`);
``gpu`` has the reader processes fetch the tiles' bytes only, and decodes, assembles and resizes on
the model's device (:mod:`preprocessing.slides.gpu_tiles`), asked for by name only until it has
been measured on a GPU; ``auto`` uses ``tiles`` where the slide allows, and OpenSlide where not.
Each reader process opens its own file handles.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import torch
from torch.utils.data import DataLoader, Dataset

from preprocessing.core.errors import InputError
from preprocessing.features.patch_transforms import StainNormaliser, resize_patch, rgba_to_rgb
from preprocessing.slides.gpu_tiles import Batch, GpuTiles
from preprocessing.slides.jpeg_tiles import DCT_DENOMINATORS, Layout, TileError, TileReader, plan_read, probe
from preprocessing.slides.reader import Slide, open_slide

#: per-patch status: BAD alone, or OK (0) with the flags STAIN_SKIPPED and FELL_BACK
OK, BAD, STAIN_SKIPPED, FELL_BACK = 0, 1, 2, 4
#: how a slide's patches are read (``--reader``)
READERS = ("auto", "tiles", "gpu", "openslide")


class PatchDataset(Dataset):
    """Patches of one slide as uint8 (H, W, 3) tensors at the encoder's input size.

    ``reader``: ``auto`` reads the JPEG tiles on the CPU (``tiles``) where
    :func:`preprocessing.slides.jpeg_tiles.probe` accepts the slide, else OpenSlide; ``tiles`` and
    ``gpu`` insist on the tiles (an InputError when the slide cannot be read so); ``openslide``
    always uses ``read_region``. ``gpu`` decodes on ``device`` (the CPU when None) and reads whole
    batches only (:func:`make_loader`, not :meth:`read`). Each process opens its own handles on
    first use (handles must not cross a fork). A tile that cannot be decoded sends its patch to
    OpenSlide (status flag ``FELL_BACK``); a patch OpenSlide cannot decode either comes back blank
    with status ``BAD``, and the OpenSlide handle is reopened, since it refuses all further reads
    after an error.
    """

    def __init__(self, slide: str | Path, coords: np.ndarray, level: int, read_size: int,
                 out_size: tuple[int, int], interpolation: str = "bicubic",
                 stain: StainNormaliser | None = None, reader: str = "auto",
                 device: torch.device | str | None = None) -> None:
        if reader not in READERS:
            raise InputError("--reader", f"unknown reader {reader!r}: use {', '.join(READERS)}")
        self.slide = str(slide)
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.level = int(level)
        self.read_size = int(read_size)
        self.out_size = (int(out_size[0]), int(out_size[1]))
        self.interpolation = interpolation
        self.stain = stain
        self.reader_asked = reader
        self.device = torch.device(device if device is not None else "cpu")
        self._gpu: GpuTiles | None = None
        self._handle: Slide | None = None
        self._pid: int | None = None
        self._tiles: TileReader | None = None
        self._extent = 0.0  # level-0 px a patch covers
        self.why_openslide = "asked for" if reader == "openslide" else ""
        if reader != "openslide":
            self._use_tiles(reader)

    def _use_tiles(self, reader: str) -> None:
        if reader == "gpu" and self.stain is not None:
            raise InputError("--reader", "gpu does not apply stain normalisation: use tiles or auto")
        gpu = reader == "gpu"  # not chosen by auto until the decoding on a GPU has been checked there
        layout = probe(self.slide)
        plan = plan_read(layout, self.level, self.read_size, self.out_size,
                         (1,) if gpu else DCT_DENOMINATORS) if isinstance(layout, Layout) else layout
        if isinstance(plan, str):
            if reader != "auto":
                raise InputError(self.slide, f"cannot read its JPEG tiles (--reader {reader}): {plan}")
            self.why_openslide = plan
            return
        assert isinstance(layout, Layout)
        page = layout.pages[self.level]
        assert not isinstance(page, str)
        self._extent = self.read_size * page.downsample
        if gpu:
            self._gpu = GpuTiles(layout, plan, self._extent, self.device)
        else:
            self._tiles = TileReader(layout, plan, self.coords, self._extent)

    @property
    def reader(self) -> str:
        """The reader that serves this slide: ``gpu``, ``tiles`` or ``openslide``."""
        return "gpu" if self._gpu is not None else "tiles" if self._tiles is not None else "openslide"

    def describe_reader(self) -> dict[str, Any]:
        """JSON-ready: the reader asked for, the one used, and how (or why not the tiles)."""
        described: dict[str, Any] = {"requested": self.reader_asked, "name": self.reader}
        if self._gpu is not None:
            described.update(self._gpu.describe())
        elif self._tiles is not None:
            described.update(self._tiles.plan.describe())
        else:
            described["why"] = self.why_openslide
        return described

    def __len__(self) -> int:
        return len(self.coords)

    def _slide(self) -> Slide:
        if self._handle is None or self._pid != os.getpid():
            self._handle = open_slide(self.slide)
            self._pid = os.getpid()
        return self._handle

    def _reset(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None

    def _openslide_region(self, x: int, y: int) -> np.ndarray | None:
        """The patch's pixels from OpenSlide (RGB, transparent areas white); None if undecodable."""
        try:
            region = self._slide().read_region((x, y), self.level, (self.read_size, self.read_size))
        except openslide.OpenSlideError:
            self._reset()
            return None
        return rgba_to_rgb(np.asarray(region))

    def fallback(self, index: int) -> tuple[np.ndarray, int]:
        """Patch ``index`` from OpenSlide at the output size for the gpu reader: ``FELL_BACK``, or
        blank and ``BAD`` when OpenSlide cannot decode it either."""
        region = self._openslide_region(*(int(v) for v in self.coords[index]))
        if region is None:
            return np.full((*self.out_size, 3), 255, np.uint8), BAD
        return resize_patch(region, self.out_size, self.interpolation), FELL_BACK

    def read(self, index: int) -> tuple[np.ndarray, int]:
        """One patch as uint8 RGB at the output size, and its status (not for the gpu reader)."""
        if self._gpu is not None:
            raise RuntimeError("the gpu reader reads whole batches: use make_loader")
        x, y = (int(v) for v in self.coords[index])
        status, region = OK, None
        if self._tiles is not None:
            try:
                region = self._tiles.region(x, y, self._extent, max(self.out_size))
            except TileError:
                status = FELL_BACK
        if region is None:
            region = self._openslide_region(x, y)
            if region is None:
                return np.full((*self.out_size, 3), 255, np.uint8), BAD
        rgb = resize_patch(region, self.out_size, self.interpolation)
        if self.stain is not None:
            rgb, normalised = self.stain(rgb)
            if not normalised:
                return rgb, status | STAIN_SKIPPED
        return rgb, status

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
                prefetch_batches: int = 4) -> Iterable[Batch]:
    """Batches (images, indices, statuses) in tile order; ``workers`` reader processes (0: read in
    this process). With the gpu reader the images come on the dataset's device."""
    if dataset._gpu is not None:
        return dataset._gpu.batches(dataset.coords, batch_indices(len(dataset), batch_size), workers,
                                    prefetch_batches, dataset.out_size, dataset.interpolation,
                                    dataset.fallback)
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {"prefetch_factor": max(1, math.ceil(prefetch_batches / workers))}
    return DataLoader(dataset, batch_sampler=batch_indices(len(dataset), batch_size), num_workers=workers,
                      pin_memory=pin_memory, **extra)
