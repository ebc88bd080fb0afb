"""Tiling speed: a pyramidal 100,000 x 80,000 px 40x slide must tile in at most 2 s on one core.

Makes the slide once with :mod:`preprocessing.demo.svs_writer` (tissue-like blobs, one flat colour per
region, lumina, a blue and a green pen mark; cached as output/benchmark-scratch/tiling_100k.svs, which takes a
few minutes to write), then times :func:`preprocessing.tiling.tile.tile_slide` on one CPU core (QC picture
included, output writing timed separately) and prints the patch count. Also times the real slide in
../shared/data when present.

    .venv/bin/python benchmarks/tiling_speed.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import openslide

from preprocessing.demo.svs_writer import write_aperio_svs
from preprocessing.tiling.tile import tile_slide, write_png
from preprocessing.tiling.tiles import write_tiles

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "output" / "benchmark-scratch"
SLIDE = OUT / "tiling_100k.svs"
REAL = ROOT / ".." / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
WIDTH, HEIGHT = 100_000, 80_000

BACKGROUND = (243, 241, 244)
EOSIN = (228, 150, 190)
HEMATOXYLIN = (150, 95, 175)
LUMEN = (240, 236, 240)
BLUE_PEN = (40, 70, 185)
GREEN_PEN = (60, 160, 90)


def _shapes(seed: int = 3) -> list[tuple[float, float, float, float, tuple[int, int, int]]]:
    """Ellipses (cx, cy, a, b, colour) in level-0 px; later ones paint over earlier ones."""
    rng = np.random.default_rng(seed)
    shapes = []
    for cx, cy in [(20_000, 20_000), (55_000, 25_000), (82_000, 22_000), (25_000, 58_000),
                   (60_000, 60_000), (88_000, 62_000)]:
        a, b = rng.uniform(8_000, 15_000, 2)
        shapes.append((cx, cy, a, b, EOSIN))
        shapes.append((cx + a / 4, cy - b / 5, a / 2.5, b / 3, HEMATOXYLIN))
        shapes.append((cx - a / 3, cy + b / 3, 1_500, 1_000, LUMEN))   # 0.3 mm^2: stays a hole
        shapes.append((cx + a / 5, cy + b / 2, 250, 200, LUMEN))        # 0.01 mm^2: filled
    shapes.append((40_000, 42_000, 9_000, 700, BLUE_PEN))
    shapes.append((74_000, 45_000, 600, 6_000, GREEN_PEN))
    return shapes


def tissue_renderer(shapes: list[tuple[float, float, float, float, tuple[int, int, int]]]):
    """A svs_writer render callback: flat tiles where a tile lies wholly inside/outside each shape."""
    def render(ds: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        x0, y0, x1, y1 = x * ds, y * ds, (x + w) * ds, (y + h) * ds
        colour, partial = BACKGROUND, []
        for cx, cy, a, b, c in shapes:
            u0, u1, v0, v1 = (x0 - cx) / a, (x1 - cx) / a, (y0 - cy) / b, (y1 - cy) / b
            du, dv = max(u0, 0.0, -u1), max(v0, 0.0, -v1)
            if du * du + dv * dv > 1:
                continue  # wholly outside
            if max(u0 * u0, u1 * u1) + max(v0 * v0, v1 * v1) <= 1:
                colour, partial = c, []  # wholly inside: covers everything below
            else:
                partial.append((cx, cy, a, b, c))
        tile = np.empty((h, w, 3), np.uint8)
        tile[:] = colour
        if partial:
            px = ((np.arange(w) + x + 0.5) * ds)[None, :]
            py = ((np.arange(h) + y + 0.5) * ds)[:, None]
            for cx, cy, a, b, c in partial:
                tile[((px - cx) / a) ** 2 + ((py - cy) / b) ** 2 <= 1] = c
        return tile

    return render


def make_slide(path: Path = SLIDE) -> Path:
    """Write the benchmark slide unless a readable one of the right size is cached."""
    if path.exists():
        try:
            with openslide.OpenSlide(path) as slide:
                if slide.dimensions == (WIDTH, HEIGHT):
                    return path
        except openslide.OpenSlideError:
            pass
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"writing {path} ({WIDTH} x {HEIGHT} px, 40x) ...", flush=True)
    write_aperio_svs(path, WIDTH, HEIGHT, tissue_renderer(_shapes()), mpp=0.25, app_mag=40)
    print(f"  written in {time.perf_counter() - start:.0f} s, {path.stat().st_size / 1e6:.0f} MB", flush=True)
    return path


def time_tiling(path: Path, repeats: int) -> None:
    """Print tiling time (min/median over ``repeats``), output-writing time and patch count."""
    times, write_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            start = time.perf_counter()
            result = tile_slide(path)
            times.append(time.perf_counter() - start)
            start = time.perf_counter()
            write_tiles(Path(tmp) / "tiles.parquet", result.tiles, result.meta)
            write_png(Path(tmp) / "qc.png", result.qc)
            write_times.append(time.perf_counter() - start)
    meta = result.meta
    print(f"{path.name}: {meta['width']} x {meta['height']} px, "
          f"mpp {meta['mpp']:.4g} ({meta['mpp_source']}), "
          f"mask level {meta['mask']['level']} (/{meta['mask']['reduce']}, {meta['mask']['mpp']:.3g} um/px)")
    print(f"  tile_slide incl. QC picture: min {min(times):.3f} s, median {statistics.median(times):.3f} s "
          f"({repeats} runs, one core); writing Parquet + PNG: {statistics.median(write_times):.3f} s")
    print(f"  {meta['n_patches']} patches of {meta['patch_size_level0']} level-0 px "
          f"(grid {meta['grid_cols']} x {meta['grid_rows']}), tissue {meta['tissue_area_mm2']:.1f} mm^2, "
          f"pen {meta['pen_area_mm2']:.2f} mm^2, warning: {meta['warning']}")


def main() -> None:
    """Make the slide if needed, pin to one core, time tiling of it and of the real slide."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    slide = make_slide()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    cv2.setNumThreads(1)
    time_tiling(slide, args.repeats)
    if REAL.exists():
        time_tiling(REAL.resolve(), args.repeats)
    else:
        print(f"(real slide {REAL} absent: skipped)")
    ideal = math.floor(WIDTH / 512) * math.floor(HEIGHT / 512)
    print(f"(full grid would be {ideal} patches)")


if __name__ == "__main__":
    main()
