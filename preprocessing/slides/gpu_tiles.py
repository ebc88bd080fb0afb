"""Patches from JPEG tiles decoded in batches on a torch device: the ``gpu`` reader.

Reader processes only fetch bytes: for each batch of patches (in tile order) they send the complete
JPEG streams of the tiles that batch needs and the main process does not hold yet
(:func:`schedule_tiles` decides which, ahead of time, from the batches and the patches' positions).
The main process decodes them in one ``torchvision.io.decode_jpeg`` call on the decode device
(nvJPEG on CUDA, libjpeg-turbo on the CPU; always at full scale, as neither offers DCT scaling),
keeps each decoded tile on that device until the last batch that needs it (at most ``cache_bytes``
of them), pastes every patch's region together by tensor slicing and resizes the batch there: area
averaging when shrinking (by matrix products with the exact area weights), the encoder's
interpolation when enlarging, as :func:`preprocessing.features.patch_transforms.resize_patch` does with
OpenCV.

Colour: photometric RGB tiles (Aperio's usual JPEG) carry no marker that says so, and libjpeg and
nvJPEG take three components without markers for YCbCr. An Adobe APP14 marker with transform 0 ("no
colour transform") is put into each RGB stream so that the decoder keeps the samples as they are.
The first tile decoded is checked against PIL (:func:`preprocessing.slides.jpeg_tiles.decode_tile`,
which sets the colour space explicitly); if they differ the decoder's other output mode (the raw
components) is tried, and if neither matches no tile is decoded on the device: every patch goes to
the caller's fallback.

Geometry is that of :class:`preprocessing.slides.jpeg_tiles.TileReader`: the same level-0 square,
white outside the image and where a tile has no bytes. A tile that cannot be read or decoded sends
the patches that need it to the caller's fallback (OpenSlide on the CPU).
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from preprocessing.slides.jpeg_tiles import Layout, Page, Plan, TileError, decode_tile, tile_stream

log = logging.getLogger(__name__)

#: Adobe APP14 segment, transform 0: three components are RGB, not to be colour-converted
ADOBE_NO_TRANSFORM = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
#: most bytes of decoded tiles kept on the decode device
CACHE_BYTES = 2**30
#: patches resized in one call (bounds the float copy)
RESIZE_CHUNK = 64
#: largest mean absolute difference (0-255) to PIL's decoding of the first tile
COLOUR_TOLERANCE = 2.0
_ENLARGE = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic", "lanczos": "bicubic"}

#: (images uint8 N x H x W x 3 on the decode device, patch indices, statuses)
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
#: a patch's pixels and status from elsewhere, given its index (called for patches of failed tiles)
Fallback = Callable[[int], tuple[np.ndarray, int]]


def device_stream(stream: bytes, colour: str) -> bytes:
    """``stream`` as the device decoder must see it: with an Adobe no-transform marker if RGB."""
    if colour == "RGB" and stream.startswith(b"\xff\xd8"):
        return stream[:2] + ADOBE_NO_TRANSFORM + stream[2:]
    return stream


@dataclass(frozen=True)
class Grid:
    """Where patch regions lie on one page's tiles, at full scale (``scale`` level-0 px per px)."""

    scale: float
    side: int  # px of a patch region
    tile_width: int
    tile_height: int
    width: int
    height: int
    columns: int

    @classmethod
    def of(cls, page: Page, plan: Plan, extent: float) -> Grid:
        """The grid of ``page`` read as ``plan`` says, for patches of ``extent`` level-0 px."""
        return cls(plan.downsample, max(1, round(extent / plan.downsample)), page.tile_width,
                   page.tile_height, page.width, page.height, page.columns)

    def box(self, x: int, y: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the patch at level-0 (x, y), right and bottom clipped."""
        left, top = round(x / self.scale), round(y / self.scale)
        return left, top, min(left + self.side, self.width), min(top + self.side, self.height)

    def tiles(self, x: int, y: int) -> list[int]:
        """Indices of the tiles under the patch at level-0 (x, y), row by row."""
        left, top, right, bottom = self.box(x, y)
        if right <= left or bottom <= top:
            return []
        tw, th = self.tile_width, self.tile_height
        return [row * self.columns + col for row in range(top // th, math.ceil(bottom / th))
                for col in range(left // tw, math.ceil(right / tw))]


@dataclass(frozen=True)
class TileSchedule:
    """Per batch: the tiles whose streams it carries, and those released once it is assembled."""

    ship: list[list[int]]
    drop: list[list[int]]


def schedule_tiles(grid: Grid, coords: np.ndarray, batches: list[list[int]], capacity: int) -> TileSchedule:
    """Which tiles each batch ships: those it needs that are not held. A tile is held from the batch
    that ships it until the last batch that needs it, or until more than ``capacity`` tiles are held
    (then the least recently used go, and are shipped again when needed)."""
    needs = [list(dict.fromkeys(t for i in batch for t in grid.tiles(*coords[i]))) for batch in batches]
    last = {t: b for b, tiles in enumerate(needs) for t in tiles}
    done: list[list[int]] = [[] for _ in needs]  # per batch: the tiles no later batch needs
    for t, b in last.items():
        done[b].append(t)
    held: OrderedDict[int, None] = OrderedDict()
    ship, drop = [], []
    for b, tiles in enumerate(needs):
        ship.append([t for t in tiles if t not in held])
        for t in tiles:
            held[t] = None
            held.move_to_end(t)
        released = [t for t in done[b] if t in held]
        for t in released:
            del held[t]
        while len(held) > capacity:
            released.append(held.popitem(last=False)[0])
        drop.append(released)
    return TileSchedule(ship, drop)


class StreamSource(Dataset):
    """Item ``b``: (b, [(tile, stream bytes | None without bytes | str why unreadable)]) for the
    tiles batch ``b`` ships. Runs in reader processes; each opens the file on first use."""

    def __init__(self, path: str, page: Page, ship: list[list[int]]) -> None:
        self.path, self.page, self.ship = path, page, ship
        self._fd: int | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.ship)

    def __getitem__(self, b: int) -> tuple[int, list[tuple[int, bytes | str | None]]]:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        out: list[tuple[int, bytes | str | None]] = []
        for t in self.ship[b]:
            try:
                stream = tile_stream(self._fd, self.page, t)
            except TileError as err:
                out.append((t, str(err)))
                continue
            out.append((t, None if stream is None else device_stream(stream, self.page.colour)))
        return b, out


def _as_is(item: Any) -> Any:
    return item


class DeviceDecoder:
    """Batched JPEG decoding on ``device`` into (3, tile height, tile width) uint8 tensors."""

    def __init__(self, device: torch.device, colour: str, tile_size: tuple[int, int]) -> None:
        self.device, self.colour, self.tile_size = device, colour, tile_size
        self.mode: ImageReadMode | None = None  # chosen by the colour check on the first tile
        self.broken = ""  # why no tile is decoded on this device
        self.decoded = 0

    def decode(self, streams: list[bytes]) -> list[torch.Tensor | str]:
        """Each stream decoded, or why it could not be (a string)."""
        if streams and self.mode is None and not self.broken:
            self._choose_mode(streams)
        if self.mode is None:
            return [self.broken or "no tile decoded yet to check the colours"] * len(streams)
        if not streams:
            return []
        tensors = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams]
        try:
            decoded: list[torch.Tensor | str] = list(decode_jpeg(tensors, mode=self.mode, device=self.device))
        except RuntimeError:  # one bad stream fails the call: decode one by one to find it
            decoded = [self._one(t, self.mode) for t in tensors]
        return [self._checked(d) for d in decoded]

    def _one(self, tensor: torch.Tensor, mode: ImageReadMode) -> torch.Tensor | str:
        try:
            return decode_jpeg(tensor, mode=mode, device=self.device)
        except RuntimeError as err:
            return f"undecodable JPEG tile ({str(err).splitlines()[-1][-120:]})"

    def _checked(self, tile: torch.Tensor | str) -> torch.Tensor | str:
        if isinstance(tile, str):
            return tile
        tw, th = self.tile_size
        if tile.ndim != 3 or tile.shape[0] != 3 or tile.shape[1] < th or tile.shape[2] < tw:
            return f"tile decodes to shape {tuple(tile.shape)}, expected (3, {th}, {tw})"
        self.decoded += 1
        return tile[:, :th, :tw]

    def _choose_mode(self, streams: list[bytes]) -> None:
        """The output mode whose decoding of the first tile PIL decodes matches PIL's."""
        reference, stream = None, b""
        for stream in streams[:4]:
            try:
                reference = torch.from_numpy(decode_tile(stream, self.colour).copy())
                break
            except TileError:
                continue
        if reference is None:
            return  # tried again on the next batch
        differences = []
        for mode in (ImageReadMode.RGB, ImageReadMode.UNCHANGED):
            tile = self._one(torch.frombuffer(bytearray(stream), dtype=torch.uint8), mode)
            if isinstance(tile, str) or tile.shape[0] != 3 or tile.shape[1:] != reference.shape[:2]:
                differences.append(math.inf)
                continue
            diff = (tile.permute(1, 2, 0).cpu().float() - reference.float()).abs().mean().item()
            differences.append(diff)
            if diff <= COLOUR_TOLERANCE:
                self.mode = mode
                return
        self.broken = (f"{self.device} decoder's colours differ from PIL's (mean abs diff "
                       f"{min(differences):.1f} of 255)")
        log.warning("%s: reading every patch with the fallback", self.broken)


def area_weights(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """(n_out, n_in) weights of an area (box) shrink: each output pixel is the mean of the input
    pixels it covers, fractions counted by the part covered, as OpenCV's ``INTER_AREA``."""
    scale = n_in / n_out
    start = torch.arange(n_out, dtype=torch.float64, device=device)[:, None] * scale
    pixel = torch.arange(n_in, dtype=torch.float64, device=device)[None, :]
    covered = (torch.minimum(pixel + 1, start + scale) - torch.maximum(pixel, start)).clamp_(min=0)
    return (covered / scale).float()


def resize_batch(regions: torch.Tensor, out_size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> uint8 (N, H, W, 3) at ``out_size``: area averaging when shrinking, the
    model's ``interpolation`` when enlarging, unchanged when already that size."""
    if regions.shape[-2:] != out_size:
        regions = torch.cat([_resize(chunk.float(), out_size, interpolation).add_(0.5).floor_()
                             .clamp_(0, 255).to(torch.uint8) for chunk in regions.split(RESIZE_CHUNK)])
    return regions.permute(0, 2, 3, 1).contiguous()


def _resize(x: torch.Tensor, out_size: tuple[int, int], interpolation: str) -> torch.Tensor:
    height, width = out_size
    if x.shape[-2] >= height and x.shape[-1] >= width:
        return area_weights(x.shape[-2], height, x.device) @ x @ area_weights(x.shape[-1], width, x.device).T
    mode = _ENLARGE.get(interpolation, "bilinear")
    options = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(x, size=(height, width), mode=mode, **options)


class GpuTiles:
    """The ``gpu`` reader of one slide: its plan, grid and decoder (see the module docstring)."""

    def __init__(self, layout: Layout, plan: Plan, extent: float, device: torch.device,
                 cache_bytes: int = CACHE_BYTES) -> None:
        page = layout.pages[plan.level]
        if isinstance(page, str) or plan.denominator != 1:
            raise ValueError(f"level {plan.level} cannot be decoded on a device at full scale")
        self.path, self.page, self.plan, self.device = layout.path, page, plan, torch.device(device)
        self.grid = Grid.of(page, plan, extent)
        self.capacity = max(16, cache_bytes // (page.tile_width * page.tile_height * 3))
        self.decoder = DeviceDecoder(self.device, page.colour, (page.tile_width, page.tile_height))

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for provenance."""
        described: dict[str, Any] = {**self.plan.describe(), "decode_device": str(self.device)}
        if self.decoder.broken:
            described["decoder_problem"] = self.decoder.broken
        return described

    def batches(self, coords: np.ndarray, batches: list[list[int]], workers: int, prefetch_batches: int,
                out_size: tuple[int, int], interpolation: str, fallback: Fallback) -> DeviceBatches:
        """The patches at ``coords`` in ``batches``, ``workers`` reader processes fetching bytes."""
        plan = schedule_tiles(self.grid, coords, batches, self.capacity)
        extra: dict[str, Any] = {}
        if workers > 0:
            extra = {"prefetch_factor": max(1, math.ceil(prefetch_batches / workers))}
        loader = DataLoader(StreamSource(self.path, self.page, plan.ship), batch_size=None,
                            num_workers=workers, collate_fn=_as_is, **extra)
        return DeviceBatches(self, loader, coords, batches, plan.drop, out_size, interpolation, fallback)


class DeviceBatches:
    """Iterable of :data:`Batch`: tile streams from the loader decoded, assembled and resized on the
    device; the reader processes start when iteration starts."""

    def __init__(self, tiles: GpuTiles, loader: DataLoader, coords: np.ndarray, batches: list[list[int]],
                 drop: list[list[int]], out_size: tuple[int, int], interpolation: str,
                 fallback: Fallback) -> None:
        self.tiles, self.loader, self.coords, self.batches, self.drop = tiles, loader, coords, batches, drop
        self.out_size, self.interpolation, self.fallback = out_size, interpolation, fallback

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        return self._run(iter(self.loader))

    def _run(self, items: Iterator[tuple[int, list[tuple[int, bytes | str | None]]]]) -> Iterator[Batch]:
        cache: dict[int, torch.Tensor | str | None] = {}
        for b, shipped in items:
            self._receive(cache, shipped)
            yield self._assemble(cache, self.batches[b])
            for t in self.drop[b]:
                del cache[t]

    def _receive(self, cache: dict[int, torch.Tensor | str | None],
                 shipped: list[tuple[int, bytes | str | None]]) -> None:
        """Decode the shipped streams (one call) into ``cache``; no bytes: None; failures: why."""
        streams = [(t, payload) for t, payload in shipped if isinstance(payload, bytes)]
        decoded = self.tiles.decoder.decode([payload for _, payload in streams])
        cache.update((t, payload) for t, payload in shipped if not isinstance(payload, bytes))
        cache.update((t, tile) for (t, _), tile in zip(streams, decoded, strict=True))

    def _assemble(self, cache: dict[int, torch.Tensor | str | None], indices: list[int]) -> Batch:
        """One batch: regions pasted from the cached tiles, resized; patches on failed tiles from
        the fallback."""
        side, device = self.tiles.grid.side, self.tiles.device
        regions = torch.full((len(indices), 3, side, side), 255, dtype=torch.uint8, device=device)
        failed = [row for row, i in enumerate(indices) if not self._paste(regions[row], cache, i)]
        images = resize_batch(regions, self.out_size, self.interpolation)
        status = np.zeros(len(indices), np.int64)
        for row in failed:
            rgb, status[row] = self.fallback(indices[row])
            images[row] = torch.from_numpy(np.ascontiguousarray(rgb)).to(device)
        return images, torch.as_tensor(indices, dtype=torch.int64), torch.from_numpy(status)

    def _paste(self, region: torch.Tensor, cache: dict[int, torch.Tensor | str | None], index: int) -> bool:
        """Paste patch ``index`` into ``region`` (3, S, S); False when one of its tiles failed."""
        grid = self.tiles.grid
        x, y = (int(v) for v in self.coords[index])
        left, top, right, bottom = grid.box(x, y)
        tw, th = grid.tile_width, grid.tile_height
        for t in grid.tiles(x, y):
            tile = cache[t]
            if tile is None:
                continue
            if isinstance(tile, str):
                return False
            row, col = divmod(t, grid.columns)
            x0, y0 = max(left, col * tw), max(top, row * th)
            x1, y1 = min(right, (col + 1) * tw), min(bottom, (row + 1) * th)
            region[:, y0 - top:y1 - top, x0 - left:x1 - left] = \
                tile[:, y0 - row * th:y1 - row * th, x0 - col * tw:x1 - col * tw]
        return True
