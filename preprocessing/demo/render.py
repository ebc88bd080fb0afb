"""Pixels of the synthetic demo slides: H&E-like tissue islands written as pyramidal Aperio SVS files.

How a slide is made, and why a 40-patient cohort of 20,000 px slides takes well under two minutes on
two cores:

* **Textures** (one tumour-like, one stroma-like) are drawn once per process at 0.25 um/px as
  periodic squares of :data:`TEXTURE_PX` pixels (512 um), in stain space (haematoxylin and eosin
  optical densities, Beer-Lambert to RGB), so nuclei have their physical size: tumour has crowded,
  round, dark nuclei of 7-11 um; stroma has pink wavy fibres with sparse elongated nuclei. A 20x slide
  uses the same texture area-averaged to 0.5 um/px. Because they are periodic, a tile anywhere on
  the slide is a seamless window into them, and each pyramid level uses the area-averaged texture,
  so every level is rendered directly instead of downsampled from level 0.
* **Layout** lives in a low-resolution map (long side about 1,000-1,500 cells, each a power-of-two
  number of level-0 pixels) with four channels: tissue opacity, tumour share, pale staining, ink.
  The tumour region is a thresholded smooth random field (nests of about 200 um) whose threshold
  makes the tumour share of the tissue area equal the planned tumour fraction.
* **Tiles** are composed from the map: glass tiles are flat (the SVS writer encodes them once),
  tiles inside one class are a texture window, and only the tiles at a border are blended per pixel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import scipy.fft

from preprocessing.core.atomic import atomic_output
from preprocessing.demo.svs_writer import write_aperio_svs

BASE_MPP = 0.25                        # textures are drawn at 40x ...
TEXTURE_PX = 2048                      # ... as periodic squares of this many pixels (512 um)
TILE = 256                             # SVS tile size
BACKGROUND = (243.0, 243.0, 241.0)     # glass
# Stain optical densities (log10) per RGB channel: haematoxylin (Ruifrok & Johnston) and an eosin
# vector chosen so that eosin alone looks H&E pink rather than magenta.
OD_H = np.array([0.650, 0.704, 0.286], np.float32)
OD_E = (np.array([0.15, 0.85, 0.50]) / np.linalg.norm([0.15, 0.85, 0.50])).astype(np.float32)
INK_RGB = {"green": (70.0, 150.0, 95.0), "blue": (60.0, 80.0, 175.0), "black": (55.0, 55.0, 65.0)}
PALE_STRENGTH = 0.55                   # a pale region keeps 45 % of the stain
N_TEXTURE_VARIANTS = 2
MIN_TISSUE, MAX_TISSUE = 0.05, 0.10                # share of a 40x slide's area covered by tissue
TUMOUR_REGION_UM, TUMOUR_DETAIL_UM = 200.0, 50.0   # smoothing scales of the tumour/stroma layout


@dataclass(frozen=True)
class SlideSpec:
    """Everything needed to render one slide file (decided by the plan, no pixels)."""

    file_name: str
    patient: str
    dx: int
    magnification: int        # 40 or 20 (AppMag)
    mpp: float                # 0.25 or 0.5 um per level-0 pixel
    width: int
    height: int
    seed: int
    tumour_fraction: float
    pen: str | None           # ink colour name, or None
    pale: bool                # a faintly stained region
    corrupt: str | None       # None for a real slide, else how it is broken

    @property
    def texture_variant(self) -> int:
        """Which of the per-process texture variants this slide uses."""
        return self.seed % N_TEXTURE_VARIANTS


# ----------------------------------------------------------------------------- noise and drawing

def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float],
                  angle: float = 0.0) -> np.ndarray:
    """Gaussian-filtered white noise, zero mean and unit sd; ``sigma`` (px) may be anisotropic
    (``(along, across)`` at ``angle`` radians). Smooth fields are made on a grid coarser by a power of
    two (fewer FFT points) and upsampled; the result is periodic when ``shape`` is a multiple of that
    power of two (always so for the textures)."""
    s_along, s_across = (sigma, sigma) if np.isscalar(sigma) else sigma
    factor = 1
    while min(s_along, s_across) / (2 * factor) >= 2:
        factor *= 2
    small = (math.ceil(shape[0] / factor), math.ceil(shape[1] / factor))
    noise = rng.standard_normal(small).astype(np.float32)
    ky = scipy.fft.fftfreq(small[0]).astype(np.float32)[:, None]
    kx = scipy.fft.rfftfreq(small[1]).astype(np.float32)[None, :]
    c, s = math.cos(angle), math.sin(angle)
    k_along, k_across = kx * c + ky * s, -kx * s + ky * c
    along, across = s_along / factor * k_along, s_across / factor * k_across
    gain = np.exp(-2.0 * math.pi**2 * (along**2 + across**2))
    out = scipy.fft.irfft2(scipy.fft.rfft2(noise) * gain, s=small).astype(np.float32)
    if factor > 1:  # upsample; still periodic when ``shape`` is a multiple of ``factor``
        padded = np.pad(out, 2, mode="wrap")
        big = cv2.resize(padded, (padded.shape[1] * factor, padded.shape[0] * factor),
                         interpolation=cv2.INTER_CUBIC)
        out = big[2 * factor:2 * factor + shape[0], 2 * factor:2 * factor + shape[1]]
    out = out - out.mean()
    return out / max(float(out.std()), 1e-6)


def _wrap_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with periodic borders."""
    if sigma < 0.3:
        return image
    pad = int(math.ceil(3 * sigma)) + 1
    padded = np.pad(image, ((pad, pad), (pad, pad)) + ((0, 0),) * (image.ndim - 2), mode="wrap")
    return cv2.GaussianBlur(padded, (0, 0), sigma)[pad:-pad, pad:-pad]


def _draw_ellipses(canvas: np.ndarray, centres: np.ndarray, axes: np.ndarray, angles: np.ndarray,
                   values: np.ndarray) -> None:
    """Draw filled ellipses on a periodic canvas (copies across the borders keep it periodic)."""
    size = canvas.shape[0]
    reach = float(axes.max()) + 2
    for (cx, cy), (a, b), ang, val in zip(centres, axes, angles, values, strict=True):
        for ox in (-size, 0, size):
            if not -reach <= cx + ox <= size + reach:
                continue
            for oy in (-size, 0, size):
                if not -reach <= cy + oy <= size + reach:
                    continue
                cv2.ellipse(canvas, (int(round(cx + ox)), int(round(cy + oy))),
                            (max(1, int(round(a))), max(1, int(round(b)))), float(ang), 0, 360,
                            float(val), -1, cv2.LINE_8)


def _random_nuclei(rng: np.random.Generator, size: int, mpp: float, density: float,
                   radius_um: tuple[float, float], aspect: tuple[float, float],
                   angle: float | None, value: tuple[float, float]) -> tuple[np.ndarray, ...]:
    """Centres, semi-axes (px), angles (deg) and stain values of nuclei at ``density`` per um^2."""
    area_um2 = (size * mpp) ** 2
    n = rng.poisson(density * area_um2)
    centres = rng.uniform(0, size, (n, 2))
    r = rng.uniform(*radius_um, n) / mpp
    asp = rng.uniform(*aspect, n)
    axes = np.stack([r * np.sqrt(asp), r / np.sqrt(asp)], 1)
    if angle is None:
        angles = rng.uniform(0, 180, n)
    else:
        angles = np.degrees(angle) + rng.normal(0, 12, n)
    values = rng.uniform(*value, n)
    return centres, axes, angles, values


def _stain_to_rgb(h: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Beer-Lambert: background light attenuated by haematoxylin and eosin optical densities."""
    ln10 = math.log(10.0)
    channels = []
    for c in range(3):
        od = cv2.addWeighted(h, -ln10 * float(OD_H[c]), e, -ln10 * float(OD_E[c]), 0.0)
        channels.append(cv2.convertScaleAbs(cv2.exp(od), alpha=BACKGROUND[c]))
    return cv2.merge(channels)


# ----------------------------------------------------------------------------- textures

def _fine_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Periodic fine-grained noise (a small Gaussian blur of white noise), zero mean and unit sd."""
    out = _wrap_blur(rng.standard_normal((size, size)).astype(np.float32), sigma)
    return (out - out.mean()) / max(float(out.std()), 1e-6)


def tumour_stains(variant: int, size: int = TEXTURE_PX,
                  mpp: float = BASE_MPP) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin density maps of tumour: crowded, large, round, dark nuclei on purple
    cytoplasm with a few gland-like lumens."""
    rng = np.random.default_rng([1, variant])
    cyto_h = 0.16 + 0.04 * _smooth_noise(rng, (size, size), 6.0 / mpp)
    cyto_e = 0.32 + 0.07 * _smooth_noise(rng, (size, size), 4.0 / mpp)
    lumen = np.zeros((size, size), np.float32)
    _draw_ellipses(lumen, *_random_nuclei(rng, size, mpp, 1 / 12000, (8, 20), (1.0, 2.0), None, (1, 1)))
    lumen = _wrap_blur(lumen, 1.0 / mpp)
    nuclei = np.zeros((size, size), np.float32)
    _draw_ellipses(nuclei, *_random_nuclei(rng, size, mpp, 1 / 90, (3.5, 5.5), (1.0, 1.6), None,
                                           (0.75, 1.15)))
    nuclei *= 1.0 - lumen
    chromatin = 1.0 + 0.22 * _fine_noise(rng, size, 0.5 / mpp)
    nuclei = _wrap_blur(nuclei, 0.35 / mpp) * chromatin
    h = cyto_h * (1 - lumen) + nuclei
    e = cyto_e * (1 - lumen) * (1 - 0.4 * np.clip(nuclei, 0, 1))
    return h, e


def stroma_stains(variant: int, size: int = TEXTURE_PX,
                  mpp: float = BASE_MPP) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin density maps of stroma: wavy pink collagen fibres, loose pale gaps,
    sparse thin elongated nuclei and a few small round lymphocytes."""
    rng = np.random.default_rng([2, variant])
    angle = float(rng.uniform(0, math.pi))
    fibres = _smooth_noise(rng, (size, size), (12.0 / mpp, 0.9 / mpp), angle)
    # Wavy fibres: displace by a smooth periodic field (remap with wrap keeps the period).
    shift = 7.0 / mpp
    dx = _smooth_noise(rng, (size, size), 30.0 / mpp) * shift
    dy = _smooth_noise(rng, (size, size), 30.0 / mpp) * shift
    grid_y, grid_x = np.mgrid[0:size, 0:size].astype(np.float32)
    fibres = cv2.remap(fibres, grid_x + dx, grid_y + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)
    loose = np.clip(_smooth_noise(rng, (size, size), 10.0 / mpp) - 0.9, 0, None)
    e = np.clip(0.42 + 0.16 * fibres, 0.05, None) * (1 - np.clip(loose * 1.5, 0, 0.85))
    nuclei = np.zeros((size, size), np.float32)
    _draw_ellipses(nuclei, *_random_nuclei(rng, size, mpp, 1 / 1400, (2.5, 4.0), (4.0, 8.0), angle,
                                           (0.6, 0.9)))
    _draw_ellipses(nuclei, *_random_nuclei(rng, size, mpp, 1 / 6000, (2.2, 3.0), (1.0, 1.2), None,
                                           (0.9, 1.2)))
    nuclei = _wrap_blur(nuclei, 0.35 / mpp)
    h = 0.035 + nuclei
    return h, e * (1 - 0.5 * np.clip(nuclei, 0, 1))


@lru_cache(maxsize=2 * N_TEXTURE_VARIANTS)
def _class_stains(kind: str, variant: int) -> tuple[np.ndarray, np.ndarray]:
    make = tumour_stains if kind == "tumour" else stroma_stains
    return make(variant)


def texture_period(mpp: float) -> int:
    """Texture period in level-0 pixels at ``mpp``: always TEXTURE_PX * BASE_MPP micrometres."""
    ratio = mpp / BASE_MPP
    if ratio < 1 or abs(ratio - round(ratio)) > 1e-6 or TEXTURE_PX % round(ratio):
        raise ValueError(f"demo slides need an MPP that is {BASE_MPP} times a power of two, not {mpp}")
    return TEXTURE_PX // round(ratio)


def class_texture(kind: str, mpp: float, variant: int, stain_scale: tuple[float, float] = (1.0, 1.0)
                  ) -> np.ndarray:
    """Periodic RGB texture of ``kind`` ("tumour" or "stroma") at ``mpp`` (the same tissue scanned at
    that resolution); ``stain_scale`` multiplies the haematoxylin and eosin amounts (slide-to-slide
    stain variation)."""
    h, e = _class_stains(kind, variant)
    rgb = _stain_to_rgb(h * np.float32(stain_scale[0]), e * np.float32(stain_scale[1]))
    period = texture_period(mpp)
    if period != rgb.shape[0]:
        rgb = cv2.resize(rgb, (period, period), interpolation=cv2.INTER_AREA)
    return rgb


# ----------------------------------------------------------------------------- layout map

def map_cell(long_side: int) -> int:
    """Level-0 pixels per layout-map cell: a power of two giving a map long side of ~1,000-1,500."""
    cell = 1
    while long_side / cell > 1536:
        cell *= 2
    return cell


def layout_map(spec: SlideSpec) -> tuple[np.ndarray, int]:
    """The slide's layout map (rows, cols, 4) float32: tissue opacity, tumour share, pale, ink; and the
    number of level-0 pixels per map cell. Deterministic from ``spec``."""
    cell = map_cell(max(spec.width, spec.height))
    mh, mw = math.ceil(spec.height / cell), math.ceil(spec.width / cell)
    long = max(mh, mw)
    rng = np.random.default_rng([3, spec.seed])
    yy, xx = np.mgrid[0:mh, 0:mw].astype(np.float32)

    def noise(sigma_frac: float) -> np.ndarray:
        return _smooth_noise(rng, (mh, mw), sigma_frac * long)

    # Distance to the nearest slide edge (fraction of the long side): tissue bends away from the
    # edges instead of being cut by them.
    edge = np.minimum(np.minimum(xx, mw - 1 - xx), np.minimum(yy, mh - 1 - yy)) / long
    border = 3.0 * np.clip((0.07 - edge) / 0.07, 0, None)
    n_blobs = int(rng.integers(1, 4))
    field = np.full((mh, mw), -np.inf, np.float32)
    rough = 0.35 * noise(0.04) + 0.12 * noise(0.012)
    for _ in range(n_blobs):
        size = min(mh, mw) * rng.uniform(0.24, 0.36) / math.sqrt(n_blobs)
        a, b = size * rng.uniform(1.0, 1.4), size * rng.uniform(0.75, 1.0)
        reach_x, reach_y = min(a * 1.2, 0.45 * mw), min(a * 1.2, 0.45 * mh)
        cx, cy = rng.uniform(reach_x, mw - reach_x), rng.uniform(reach_y, mh - reach_y)
        t = rng.uniform(0, math.pi)
        u = ((xx - cx) * math.cos(t) + (yy - cy) * math.sin(t)) / a
        v = (-(xx - cx) * math.sin(t) + (yy - cy) * math.cos(t)) / b
        field = np.maximum(field, 1 - u * u - v * v)
    for _ in range(int(rng.integers(0, 4))):  # small fragments
        cx, cy = rng.uniform(0.1, 0.9) * mw, rng.uniform(0.1, 0.9) * mh
        r = long * rng.uniform(0.015, 0.04)
        field = np.maximum(field, 1 - ((xx - cx) ** 2 + (yy - cy) ** 2) / r**2)
    level = np.where(edge > 0.01, field + rough - border, -np.inf)
    # Grow or shrink the islands (move the contour level) if the tissue area is far off.
    # The limits are for a 40x slide; a 20x slide of the same pixel size shows four times the glass
    # around a section of the same physical size, so a quarter of the share.
    physical = (0.25 / spec.mpp) ** 2
    low, high = MIN_TISSUE * physical, MAX_TISSUE * physical
    coverage = float((level > 0).mean())
    threshold = 0.0
    if not low <= coverage <= high:
        threshold = float(np.quantile(level, 1 - (low if coverage < low else high)))
    mask = level > threshold
    alpha = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 0.8)

    # Tumour nests and stroma bands have a physical size (about 200 um, with 50 um detail), whatever
    # the slide's size or magnification.
    um_per_cell = spec.mpp * cell
    tum_field = (_smooth_noise(rng, (mh, mw), TUMOUR_REGION_UM / um_per_cell)
                 + 0.35 * _smooth_noise(rng, (mh, mw), TUMOUR_DETAIL_UM / um_per_cell))
    inside = tum_field[alpha > 0.5]
    threshold = np.quantile(inside, 1 - spec.tumour_fraction) if inside.size else 0.0
    tumour = cv2.GaussianBlur((tum_field > threshold).astype(np.float32), (0, 0), 0.7)

    pale = np.zeros((mh, mw), np.float32)
    if spec.pale:
        pale_field = noise(0.08)
        pale_thr = np.quantile(pale_field[alpha > 0.5], 0.7) if inside.size else 0.0  # 30 % of tissue
        pale = cv2.GaussianBlur((pale_field > pale_thr).astype(np.float32), (0, 0), 1.5)

    ink = np.zeros((mh, mw), np.float32)
    if spec.pen:
        ink = _pen_stroke(rng, mh, mw, alpha)
    return np.ascontiguousarray(np.stack([alpha, tumour, pale, ink], -1)), cell


def _pen_stroke(rng: np.random.Generator, mh: int, mw: int, alpha: np.ndarray) -> np.ndarray:
    """A marker line: a wobbly circle around part of the tissue, or an open curved stroke."""
    long = max(mh, mw)
    canvas = np.zeros((mh, mw), np.uint8)
    ys, xs = np.nonzero(alpha > 0.5)
    k = int(rng.integers(len(xs))) if len(xs) else 0
    cx, cy = (float(xs[k]), float(ys[k])) if len(xs) else (mw / 2, mh / 2)
    t = np.linspace(0, 2 * math.pi, 200)
    if rng.random() < 0.5:
        r = long * rng.uniform(0.08, 0.16) * (1 + 0.12 * np.sin(3 * t + rng.uniform(0, 6)))
        pts = np.stack([cx + r * np.cos(t) * 1.3, cy + r * np.sin(t)], 1)
        closed = True
    else:
        length = long * rng.uniform(0.2, 0.35)
        direction = rng.uniform(0, math.pi)
        s = np.linspace(-0.5, 0.5, 200) * length
        bend = 0.1 * length * np.sin(np.linspace(0, math.pi, 200) * rng.uniform(0.8, 2.0))
        pts = np.stack([cx + s * math.cos(direction) - bend * math.sin(direction),
                        cy + s * math.sin(direction) + bend * math.cos(direction)], 1)
        closed = False
    thickness = max(2, int(round(0.012 * long)))
    cv2.polylines(canvas, [np.round(pts).astype(np.int32)], closed, 255, thickness, cv2.LINE_AA)
    return cv2.GaussianBlur(canvas.astype(np.float32) / 255.0, (0, 0), 0.7) * 0.85


def map_tumour_share(layout: np.ndarray) -> float:
    """Tumour share of the tissue area in a layout map (what the plan's tumour fraction becomes)."""
    alpha, tumour = layout[..., 0], layout[..., 1]
    return float((alpha * tumour).sum() / max(float(alpha.sum()), 1e-9))


# ----------------------------------------------------------------------------- tile composition

def _tile_extreme(op: np.ufunc, grid: np.ndarray, step: int, axis: int) -> np.ndarray:
    """Along ``axis``, ``op`` over windows of ``step + 2`` cells starting every ``step`` cells (the
    cells under one tile plus the one-cell margins), for as many windows as fit."""
    n = (grid.shape[axis] - 2) // step - 1
    g = np.moveaxis(grid, axis, 0)
    out = op.reduce(g[:n * step].reshape(n, step, *g.shape[1:]), axis=1)
    out = op(out, g[step:(n + 1) * step:step])
    out = op(out, g[step + 1:(n + 1) * step + 1:step])
    return np.moveaxis(out, 0, axis)


class _Level:
    """Per-pyramid-level state: textures at that level's scale and the layout map upsampling."""

    def __init__(self, ds: int, layout: np.ndarray, cell: int, textures: dict[str, np.ndarray]) -> None:
        base = next(iter(textures.values())).shape[0]
        period = max(1, base // ds)
        reps = math.ceil((period + TILE) / period)
        self.period = period
        self.textures = {}
        for kind, tex in textures.items():
            small = tex if ds == 1 else cv2.resize(tex, (period, period), interpolation=cv2.INTER_AREA)
            # Room for a tile window starting anywhere in one period.
            small = small.reshape(period, period, 3)
            if period >= TILE:
                self.textures[kind] = np.pad(small, ((0, TILE), (0, TILE), (0, 0)), mode="wrap")
            else:
                self.textures[kind] = np.tile(small, (reps, reps, 1))
        if cell >= ds:
            self.scale, src = cell // ds, layout
        else:  # coarser than the map: area-average the map first
            factor = ds // cell
            size = (max(1, math.ceil(layout.shape[1] / factor)), max(1, math.ceil(layout.shape[0] / factor)))
            self.scale, src = 1, cv2.resize(layout, size, interpolation=cv2.INTER_AREA)
        # One cell of replicated border on every side (plus two tiles' worth at the far ends).
        step = TILE // self.scale              # map cells per tile
        self.map = cv2.copyMakeBorder(src, 1, 2 * step + 2, 1, 2 * step + 2, cv2.BORDER_REPLICATE)
        # Per-tile extremes of every channel over exactly the cells a tile reads (margin included).
        self.hi = _tile_extreme(np.maximum, _tile_extreme(np.maximum, self.map, step, 0), step, 1)
        self.lo = _tile_extreme(np.minimum, _tile_extreme(np.minimum, self.map, step, 0), step, 1)

    def cells(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """The map cells under a tile, with a one-cell margin (for min/max tests and upsampling)."""
        s = self.scale
        x0, y0 = x // s, y // s          # tiles start on multiples of TILE, and s divides TILE
        nx, ny = math.ceil(w / s) + 2, math.ceil(h / s) + 2
        return self.map[y0:y0 + ny, x0:x0 + nx]

    def channel(self, x: int, y: int, w: int, h: int, c: int) -> np.ndarray:
        """Channel ``c`` of the map bilinearly upsampled to the tile's pixels (contiguous float32)."""
        s = self.scale
        cells = np.ascontiguousarray(self.cells(x, y, w, h)[..., c])
        if s == 1:
            return np.ascontiguousarray(cells[1:1 + h, 1:1 + w])
        big = cv2.resize(cells, (cells.shape[1] * s, cells.shape[0] * s), interpolation=cv2.INTER_LINEAR)
        return np.ascontiguousarray(big[s:s + h, s:s + w])


def slide_renderer(spec: SlideSpec) -> Callable[[float, int, int, int, int], np.ndarray]:
    """The render callback of one slide for :func:`preprocessing.demo.svs_writer.write_aperio_svs`."""
    layout, cell = layout_map(spec)
    rng = np.random.default_rng([4, spec.seed])
    stain = (float(rng.uniform(0.85, 1.15)), float(rng.uniform(0.85, 1.15)))
    textures = {k: class_texture(k, spec.mpp, spec.texture_variant, stain) for k in ("tumour", "stroma")}
    ink = np.asarray(INK_RGB.get(spec.pen or "black"), np.float32) / 255.0
    glass_colour = np.round(np.asarray(BACKGROUND)).astype(np.uint8)
    flat_glass = np.broadcast_to(glass_colour, (TILE, TILE, 3))   # the writer sees it is flat
    glass_full = np.ascontiguousarray(flat_glass)                 # for blending
    levels: dict[int, _Level] = {}
    eps = 1.0 / 512

    def render(ds: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        key = int(ds)
        if key not in levels:
            levels[key] = _Level(key, layout, cell, textures)
        level = levels[key]
        hi, lo = level.hi[y // TILE, x // TILE], level.lo[y // TILE, x // TILE]
        if hi[0] < eps and hi[3] < eps:
            return flat_glass[:h, :w]                   # glass: a flat tile (encoded once)
        ox, oy = x % level.period, y % level.period
        tum = level.textures["tumour"][oy:oy + h, ox:ox + w]
        stro = level.textures["stroma"][oy:oy + h, ox:ox + w]
        vary = (hi - lo) >= eps

        def weight(c: int) -> np.ndarray | float:
            return level.channel(x, y, w, h, c) if vary[c] else float(lo[c])

        # Tissue colour: one texture, a constant mix, or a per-pixel mix at a tumour/stroma border.
        t = weight(1)
        if isinstance(t, float):
            tissue = tum if t > 1 - eps else stro if t < eps else cv2.addWeighted(tum, t, stro, 1 - t, 0)
        else:
            tissue = cv2.blendLinear(tum, stro, t, 1 - t)
        # Stain strength: tissue edges fade into glass, pale regions keep a fraction of the stain.
        alpha, pale = weight(0), weight(2)
        fade = alpha * (1 - PALE_STRENGTH * pale)
        glass = glass_full[:h, :w]
        if isinstance(fade, float):
            out = tissue if fade > 1 - eps else cv2.addWeighted(tissue, fade, glass, 1 - fade, 0)
        else:
            fade = np.ascontiguousarray(fade, np.float32)
            out = cv2.blendLinear(tissue, glass, fade, 1 - fade)
        if hi[3] >= eps:  # marker ink absorbs on top of everything
            ink_w = np.broadcast_to(np.asarray(weight(3), np.float32), (h, w))
            out = cv2.convertScaleAbs(out * (1 - ink_w[..., None] * (1 - ink)))
        return out

    return render


def write_slide(spec: SlideSpec, path: str | Path, quality: int = 80) -> Path:
    """Render ``spec`` into a pyramidal Aperio SVS at ``path`` (or a broken file if ``spec.corrupt``)."""
    path = Path(path)
    if spec.corrupt:
        return write_corrupt(spec, path)
    return write_aperio_svs(path, spec.width, spec.height, slide_renderer(spec), mpp=spec.mpp,
                            app_mag=spec.magnification, tile=TILE, quality=quality)


def write_corrupt(spec: SlideSpec, path: Path) -> Path:
    """A file with a slide's name that no reader can open: a TIFF cut short, random bytes, or an
    HTML error page saved under the slide's name (a failed download)."""
    rng = np.random.default_rng([5, spec.seed])
    with atomic_output(path) as tmp:
        if spec.corrupt == "truncated":
            small = replace(spec, width=2048, height=1536, corrupt=None, pen=None)
            write_aperio_svs(tmp, small.width, small.height, slide_renderer(small), mpp=spec.mpp,
                             app_mag=spec.magnification, tile=TILE)
            data = tmp.read_bytes()
            tmp.write_bytes(data[: len(data) // 3])
        elif spec.corrupt == "garbage":
            tmp.write_bytes(rng.bytes(int(rng.integers(50_000, 200_000))))
        else:
            tmp.write_bytes(b"<html><head><title>502 Bad Gateway</title></head><body>"
                            b"<h1>502 Bad Gateway</h1></body></html>\n")
    return path
