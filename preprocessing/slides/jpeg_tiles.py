"""Patches read straight from the JPEG tiles of a tiled TIFF/SVS pyramid, each tile decoded once.

OpenSlide's ``read_region`` decodes and composites the tiles under a patch again for every patch,
always at the pyramid level asked for. This reader takes the raw bytes of each tile from the file
(tifffile gives their offsets, sizes and the page's shared JPEG tables), decodes the tiles a slide's
patches need once each, in tile order, into a bounded LRU cache, and decodes them at the coarsest
JPEG DCT scale (1/2, 1/4, 1/8, through PIL's ``draft``) that still gives the encoder at least its
input size. The patch covers the same level-0 square as OpenSlide's ``read_region`` at the tiles
file's level and read size; it may come from a finer page at a DCT scale, or a coarser one. A
DCT-scaled region that is shrunk further is first sharpened slightly (:meth:`TileReader.region`).

What it serves: Aperio SVS and generic tiled TIFF (OpenSlide vendors ``aperio`` and
``generic-tiff``) whose pyramid level is tiled, 8-bit, 3-sample, chunky JPEG (TIFF compression 7) in
YCbCr or RGB. Photometric RGB (Aperio's usual JPEG) is decoded without a colour transform whatever
the JPEG markers say, as OpenSlide does. :func:`probe` says why any other slide (JPEG 2000 SVS,
LZW, NDPI, MRXS, stripped images, ...) is not served: the caller then reads it with OpenSlide.

Pixels outside the level's image are white (OpenSlide leaves them transparent, which extraction
composites on white), and so are tiles with no bytes. A tile that cannot be read or decoded raises
:class:`TileError`, so that the caller can read that patch with OpenSlide instead. Where a level-0
position does not fall on a whole pixel of the page and scale read, the patch is taken from the
nearest whole pixel (at most half a decoded pixel away); OpenSlide interpolates instead.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import openslide
import tifffile
from PIL import Image

from preprocessing.core.errors import InputError
from preprocessing.slides.reader import open_slide

#: OpenSlide vendors whose tiled JPEG levels this reader serves
SUPPORTED_VENDORS = ("aperio", "generic-tiff", "ome-tiff")
#: JPEG DCT scaling denominators libjpeg offers through PIL's draft
DCT_DENOMINATORS = (1, 2, 4, 8)
#: most bytes of decoded tiles kept per reader process
CACHE_BYTES = 192 * 2**20
#: strength of the 3 x 3 sharpening of a DCT-scaled region that is shrunk further (see ``region``)
DCT_SHARPEN = 0.05
_SHARPEN_KERNEL = np.array([[0, -DCT_SHARPEN, 0], [-DCT_SHARPEN, 1 + 4 * DCT_SHARPEN, -DCT_SHARPEN],
                            [0, -DCT_SHARPEN, 0]], dtype=np.float32)
_JPEG = 7
_PHOTOMETRIC = {2: "RGB", 6: "YCbCr"}  # the JPEG samples' colour space for each TIFF photometric


class TileError(Exception):
    """A tile whose bytes cannot be read or decoded."""


@dataclass(frozen=True)
class Page:
    """One pyramid level as JPEG tiles: sizes, OpenSlide's downsample, where each tile's bytes are."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    downsample: float
    offsets: np.ndarray
    counts: np.ndarray
    tables: bytes | None
    colour: str  # colour space of the JPEG samples: "RGB" (no transform) or "YCbCr"

    @property
    def columns(self) -> int:
        return -(-self.width // self.tile_width)


@dataclass(frozen=True)
class Layout:
    """The tiles of every pyramid level of one slide; a string for a level this reader cannot read."""

    path: str
    vendor: str
    pages: tuple[Page | str, ...]


@dataclass(frozen=True)
class Plan:
    """How patches are read: from which level, at which DCT scale (1/denominator)."""

    level: int
    denominator: int
    downsample: float  # level-0 px per decoded px

    def describe(self) -> dict[str, float | int]:
        """JSON-ready summary for provenance."""
        return {"page_level": self.level, "dct_scale": 1 / self.denominator,
                "decoded_downsample": round(self.downsample, 4)}


def probe(path: str | Path) -> Layout | str:
    """The slide's tile layout, or why this reader cannot serve it (it is then read with OpenSlide)."""
    try:
        with contextlib.closing(open_slide(path)) as slide:
            vendor = str(slide.properties.get(openslide.PROPERTY_NAME_VENDOR))
            levels = list(zip(slide.level_dimensions, slide.level_downsamples, strict=True))
    except InputError as err:
        return f"it cannot be opened ({err.reason})"
    except (openslide.OpenSlideError, OSError) as err:
        return f"it cannot be opened ({err})"
    if vendor not in SUPPORTED_VENDORS:
        return f"vendor {vendor!r}: tiles are read for {', '.join(SUPPORTED_VENDORS)} slides only"
    try:
        with tifffile.TiffFile(path) as tif:
            candidates = _tiff_pages(tif)
            pages = tuple(_page(candidates, w, h, ds) for (w, h), ds in levels)
    except Exception as err:  # noqa: BLE001 - a TIFF tifffile cannot parse is simply not served
        return f"tifffile cannot read it ({type(err).__name__}: {err})"
    return Layout(str(path), vendor, pages)


def _tiff_pages(tif: tifffile.TiffFile) -> list[tifffile.TiffPage]:
    """Every image directory that may hold a pyramid level: top-level pages, then series levels."""
    found: list[tifffile.TiffPage] = [p for p in tif.pages if isinstance(p, tifffile.TiffPage)]
    seen = {p.offset for p in found}
    for series in tif.series:
        for level in series.levels:
            page = level.keyframe
            if isinstance(page, tifffile.TiffPage) and page.offset not in seen:
                found.append(page)
                seen.add(page.offset)
    return found


def _page(candidates: list[tifffile.TiffPage], width: int, height: int, downsample: float) -> Page | str:
    """The tiled page of ``width`` x ``height`` px as a :class:`Page`, or why it cannot be read."""
    sized = [p for p in candidates if (p.imagewidth, p.imagelength) == (width, height)]
    page = next((p for p in sized if p.is_tiled), None)
    if page is None:
        return f"no tiled TIFF page of {width} x {height} px"
    compression, photometric = int(page.compression), int(page.photometric)
    if compression != _JPEG:
        return f"TIFF compression {compression}, not JPEG (7)"
    if photometric not in _PHOTOMETRIC:
        return f"photometric {photometric}: only RGB and YCbCr JPEG are read"
    if (page.samplesperpixel, page.bitspersample, int(page.planarconfig)) != (3, 8, 1) or (
            page.imagedepth != 1 or page.tiledepth != 1):
        return "not 8-bit 3-sample chunky 2-D tiles"
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    counts = np.asarray(page.databytecounts, dtype=np.int64)
    tiles = -(-width // page.tilewidth) * -(-height // page.tilelength)
    if len(offsets) != tiles or len(counts) != tiles:
        return f"{len(offsets)} tile offsets for {tiles} tiles"
    tables = bytes(page.jpegtables) if page.jpegtables else None
    return Page(width, height, int(page.tilewidth), int(page.tilelength), float(downsample), offsets,
                counts, tables, _PHOTOMETRIC[photometric])


def plan_read(layout: Layout, level: int, read_size: int, out_size: tuple[int, int],
              denominators: tuple[int, ...] = DCT_DENOMINATORS) -> Plan | str:
    """The page and DCT scale that read the fewest pixels yet give at least ``out_size`` for a patch
    that OpenSlide reads as ``read_size`` px at ``level``; or why this slide's level cannot be read.

    When no page and scale reach ``out_size`` (OpenSlide's read is enlarged), ``level`` itself is read
    at full scale, as OpenSlide reads it. ``denominators``: the DCT scales the decoder offers
    (``(1,)`` for one without DCT scaling, such as nvJPEG).
    """
    own = layout.pages[level]
    if isinstance(own, str):
        return f"level {level}: {own}"
    extent = read_size * own.downsample  # level-0 px that OpenSlide's read covers
    need = max(out_size)
    best = Plan(level, 1, own.downsample)
    for index in reversed(range(len(layout.pages))):  # coarser pages first: fewer bytes for one scale
        page = layout.pages[index]
        if isinstance(page, str):
            continue
        for denominator in denominators:
            scale = page.downsample * denominator
            if extent / scale >= need and scale > best.downsample * 1.001:
                best = Plan(index, denominator, scale)
    return best


def decode_tile(data: bytes, colour: str, denominator: int = 1) -> np.ndarray:
    """Decode one complete JPEG stream to RGB uint8 at 1/``denominator`` scale.

    ``colour`` is the colour space of the samples ("RGB": kept as they are; "YCbCr": converted),
    set on the decoder rather than guessed from the JPEG markers. Any failure is a TileError.
    """
    try:
        image = Image.open(io.BytesIO(data), formats=("JPEG",))
        if image.mode != "RGB":
            raise TileError(f"JPEG of mode {image.mode}, not 3-component")
        if denominator > 1:
            image.draft("RGB", (max(1, image.width // denominator), max(1, image.height // denominator)))
        (tile,) = image.tile
        image.tile = [type(tile)(tile[0], tile[1], tile[2], ("RGB", colour))]
        pixels = np.asarray(image)
    except TileError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        raise TileError(f"undecodable JPEG tile ({type(err).__name__}: {err})") from None
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise TileError(f"decoded tile has shape {pixels.shape}")
    return pixels


def tile_stream(fd: int, page: Page, index: int) -> bytes | None:
    """Tile ``index`` of ``page`` as a complete JPEG stream (the page's shared tables joined in),
    read from the open file ``fd``; None for a tile without bytes. TileError when it cannot be read."""
    offset, count = int(page.offsets[index]), int(page.counts[index])
    if count == 0:
        return None
    try:
        data = os.pread(fd, count, offset)
    except OSError as err:
        raise TileError(f"cannot read tile {index} ({err})") from None
    if len(data) != count:
        raise TileError(f"tile {index} is cut short ({len(data)} of {count} bytes)")
    if page.tables is not None and len(page.tables) > 4:
        if not (page.tables.endswith(b"\xff\xd9") and data.startswith(b"\xff\xd8")):
            raise TileError(f"tile {index} or the JPEG tables lack their markers")
        data = page.tables[:-2] + data[2:]
    return data


class TileReader:
    """Patches of one slide from its tiles (see the module docstring); one per reader process.

    The file is opened on first use in each process (a descriptor must not cross a fork). ``region``
    returns the level-0 square a patch covers at the plan's scale; the caller resizes it. Given the
    patches' level-0 ``coords`` and side ``extent``, the LRU cache holds the tiles of two rows of
    patches across their span (patches read in tile order then decode each tile once), at most
    ``cache_bytes``.
    """

    def __init__(self, layout: Layout, plan: Plan, coords: np.ndarray | None = None, extent: float = 0.0,
                 cache_bytes: int = CACHE_BYTES) -> None:
        page = layout.pages[plan.level]
        if isinstance(page, str):
            raise ValueError(f"level {plan.level} cannot be read from tiles: {page}")
        self.path = layout.path
        self.page = page
        self.plan = plan
        d = plan.denominator
        self.tile_size = (-(-page.tile_width // d), -(-page.tile_height // d))
        self.image_size = (-(-page.width // d), -(-page.height // d))
        self.capacity = self._capacity(coords, extent, cache_bytes)
        self.decoded = 0  # tiles decoded in this process
        self._cache: OrderedDict[tuple[int, int], np.ndarray | None] = OrderedDict()
        self._fd: int | None = None
        self._pid: int | None = None

    def _capacity(self, coords: np.ndarray | None, extent: float, cache_bytes: int) -> int:
        tw, th = self.tile_size
        limit = max(16, cache_bytes // (tw * th * 3))
        if coords is None or not len(coords):
            return limit
        scale = self.plan.downsample
        across = math.ceil((np.ptp(coords[:, 0]) + extent) / scale / tw) + 1
        down = math.ceil(extent / scale / th) + 1
        return int(min(limit, max(16, across * (down + 1))))

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
            self._cache.clear()
        return self._fd

    def close(self) -> None:
        """Close this process's file descriptor."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def tile(self, col: int, row: int) -> np.ndarray | None:
        """Tile (col, row) decoded at the plan's scale (cached); None for a tile without bytes."""
        key = (col, row)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        pixels = self._decode(row * self.page.columns + col)
        self._cache[key] = pixels
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return pixels

    def _decode(self, index: int) -> np.ndarray | None:
        page = self.page
        data = tile_stream(self._file(), page, index)
        if data is None:
            return None
        pixels = decode_tile(data, page.colour, self.plan.denominator)
        tw, th = self.tile_size
        if pixels.shape[0] < th or pixels.shape[1] < tw:
            raise TileError(f"tile {index} decodes to {pixels.shape[1]} x {pixels.shape[0]} px, "
                            f"expected {tw} x {th}")
        self.decoded += 1
        return pixels

    def region(self, x: int, y: int, extent: float, out_side: int = 0) -> np.ndarray:
        """RGB of the level-0 square at (``x``, ``y``) of side ``extent`` px, at the plan's scale;
        white outside the image and where a tile has no bytes. TileError for a damaged tile.

        A DCT-scaled pixel is already about the mean of the pixels it stands for, so an area resize
        of a scaled region blurs it a second time, which OpenSlide's full-resolution read and area
        resize do not: when the region is DCT-scaled and larger than ``out_side`` (the size it is
        then shrunk to), a mild 3 x 3 sharpening (``DCT_SHARPEN``) undoes most of that. Measured on
        40x demo slides at 1/2 scale: the default encoder's worst cosine to OpenSlide's features rose
        from 0.994 to 0.997 (see benchmarks/read_throughput.py).
        """
        out = self._assemble(x, y, extent)
        if self.plan.denominator > 1 and len(out) > out_side:
            out = cv2.filter2D(out, -1, _SHARPEN_KERNEL, borderType=cv2.BORDER_REPLICATE)
        return out

    def _assemble(self, x: int, y: int, extent: float) -> np.ndarray:
        """The region of :meth:`region` pasted together from the decoded tiles."""
        scale = self.plan.downsample
        left, top = round(x / scale), round(y / scale)
        side = max(1, round(extent / scale))
        out = np.full((side, side, 3), 255, np.uint8)
        (tw, th), (width, height) = self.tile_size, self.image_size
        right, bottom = min(left + side, width), min(top + side, height)
        if right <= left or bottom <= top:
            return out
        for row in range(top // th, math.ceil(bottom / th)):
            for col in range(left // tw, math.ceil(right / tw)):
                pixels = self.tile(col, row)
                if pixels is None:
                    continue
                x0, y0 = max(left, col * tw), max(top, row * th)
                x1, y1 = min(right, (col + 1) * tw), min(bottom, (row + 1) * th)
                out[y0 - top:y1 - top, x0 - left:x1 - left] = \
                    pixels[y0 - row * th:y1 - row * th, x0 - col * tw:x1 - col * tw]
        return out
