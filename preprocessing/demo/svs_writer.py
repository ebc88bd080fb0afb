"""Write pyramidal Aperio SVS files (tiled JPEG TIFF pages, largest first) that OpenSlide reads.

Used by the demo cohort, by tests (slides with known MPP, size and content) and by benchmarks (a
100,000 px slide). Pixels come from a *render* callback asked for one tile at a time, so a slide far
larger than memory can be written; tiles of one flat colour (background) are JPEG-encoded once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

from preprocessing.core.atomic import atomic_output

#: render(downsample, x, y, width, height) -> uint8 array (height, width, 3) in that level's pixels.
RenderFn = Callable[[float, int, int, int, int], np.ndarray]


def pyramid_sizes(width: int, height: int, factor: int = 4, min_levels: int = 3,
                  smallest_side: int = 256) -> list[tuple[int, int, int]]:
    """Level sizes as (downsample, width, height): divide by ``factor`` while the long side stays
    above ``smallest_side``, but always at least ``min_levels`` levels (as Aperio scanners do)."""
    levels = [(1, width, height)]
    ds = 1
    while len(levels) < min_levels or max(width, height) // (ds * factor) >= smallest_side:
        ds *= factor
        levels.append((ds, max(1, math.ceil(width / ds)), max(1, math.ceil(height / ds))))
        if max(levels[-1][1:]) <= 1:
            break
    return levels


def aperio_description(width: int, height: int, tile: int, quality: int,
                       mpp: float | None, app_mag: float | None) -> str:
    """An ImageDescription in the Aperio layout: header line, then ``|key = value`` fields."""
    fields = [f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] "
              f"({tile}x{tile}) JPEG/RGB Q={quality}"]
    if app_mag is not None:
        fields.append(f"AppMag = {app_mag:g}")
    if mpp is not None:
        fields.append(f"MPP = {mpp:.4f}")
    return "|".join(fields)


def _flat_colour(pixels: np.ndarray) -> tuple[int, ...] | None:
    """The tile's colour if every pixel has it, else None. Cheap for the common cases: a broadcast
    view (a renderer's way to say "flat") is recognised from its strides, and a textured tile is
    usually rejected from a sparse sample before the full comparison."""
    first = pixels[0, 0]
    if pixels.strides[0] == 0 and pixels.strides[1] == 0:
        return tuple(int(v) for v in first)
    if not (pixels[::16, ::16] == first).all() or not (pixels == first).all():
        return None
    return tuple(int(v) for v in first)


def _encoded_tiles(render: RenderFn, ds: float, width: int, height: int, tile: int,
                   quality: int, cache: dict[tuple[int, ...], bytes]) -> Iterator[bytes]:
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            w, h = min(tile, width - x), min(tile, height - y)
            pixels = np.asarray(render(ds, x, y, w, h), dtype=np.uint8)
            if pixels.shape != (h, w, 3):
                raise ValueError(f"render returned {pixels.shape}, expected {(h, w, 3)}")
            colour = _flat_colour(pixels)
            if colour is not None:
                # A flat tile (background) is encoded once per colour, padding included.
                if colour not in cache:
                    cache[colour] = imagecodecs.jpeg8_encode(
                        np.full((tile, tile, 3), colour, np.uint8), level=quality)
                yield cache[colour]
                continue
            if (w, h) != (tile, tile):
                # Repeat the edge into the padding: white padding would bleed into the last pixels.
                pixels = np.pad(pixels, ((0, tile - h), (0, tile - w), (0, 0)), mode="edge")
            yield imagecodecs.jpeg8_encode(np.ascontiguousarray(pixels), level=quality)


def write_aperio_svs(path: str | Path, width: int, height: int, render: RenderFn, *,
                     mpp: float | None = 0.25, app_mag: float | None = 40, tile: int = 256,
                     quality: int = 80, min_levels: int = 3) -> Path:
    """Write a pyramidal SVS of ``width`` x ``height`` level-0 pixels; returns the path.

    ``mpp``/``app_mag`` set to None leave that field out of the description (to test slides with
    missing metadata). The file appears under its name only once complete.
    """
    path = Path(path)
    levels = pyramid_sizes(width, height, min_levels=min_levels)
    cache: dict[tuple[int, ...], bytes] = {}
    with atomic_output(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=width * height > 2**31) as tif:
        for ds, w, h in levels:
            tif.write(
                _encoded_tiles(render, ds, w, h, tile, quality, cache),
                shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                compression="jpeg", description=aperio_description(w, h, tile, quality, mpp, app_mag),
                metadata=None, subfiletype=0 if ds == 1 else 1,
            )
    return path


def array_renderer(image: np.ndarray) -> RenderFn:
    """A render callback over an in-memory RGB image, with area-averaged pyramid levels."""
    import cv2

    image = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
    cache: dict[float, np.ndarray] = {1: image}

    def render(ds: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        if ds not in cache:
            size = (max(1, math.ceil(image.shape[1] / ds)), max(1, math.ceil(image.shape[0] / ds)))
            cache[ds] = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        return cache[ds][y:y + h, x:x + w]

    return render


def write_svs_from_array(path: str | Path, image: np.ndarray, **kwargs: object) -> Path:
    """Write an in-memory RGB image as a pyramidal SVS (keywords as :func:`write_aperio_svs`)."""
    return write_aperio_svs(path, image.shape[1], image.shape[0], array_renderer(image), **kwargs)
