"""Tissue mask of a low-resolution slide image, and the tissue fraction of patches from it.

The mask works at a physical resolution (``MaskParams.mask_mpp``, ~8 um/px), so the same slide gives
the same mask whether scanned at 20x or 40x. Steps (OpenCV):

1. Pen marks (blue, green, black ink) are found by hue/saturation/value rules and excluded: H&E is
   pink to purple, never green; blue ink is far more saturated than hematoxylin; black ink is darker
   than any stained tissue at this resolution.
2. Saturation, median-blurred, thresholded with Otsu. White background has almost no saturation.
   The threshold is clipped to ``[saturation_min, saturation_max]``: a slide with no tissue (all
   background, i.e. noise only) then gives an empty mask instead of a threshold picked in noise,
   and a slide that is nearly all tissue is not split between pale and dark tissue.
   Otsu on a slide with both dark and pale (faintly stained) tissue puts its threshold between the
   two, so pale areas are added back: pixels above ``pale_saturation_min`` that remain after a
   morphological opening of ``pale_open_um`` (wide pale regions survive it; the thin rim of mixed
   pixels around dark tissue does not, so the mask does not grow at tissue edges).
3. Morphological close, then holes smaller than ``max_hole_um2`` (about one patch) are filled (gaps
   between fibres, small lumina: the patch around them is still tissue) and regions smaller than
   ``min_region_um2`` dropped (dust, debris).

Tissue fractions of patches are exact box integrals over the mask (summed-area table, bilinear at
fractional pixel positions), so boxes need not align with mask pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np


@dataclass(frozen=True)
class MaskParams:
    """Tissue-mask parameters; lengths and areas are physical, converted with the mask's MPP."""

    mask_mpp: float = 8.0           # aimed-for mask resolution (um/px)
    median_um: float = 40.0         # median blur window on saturation
    saturation_min: int = 20        # Otsu threshold clipped to this range (0-255)
    saturation_max: int = 60
    pale_saturation_min: int = 20   # pale tissue (faint eosin) sits at 20-40; glass below 15
    pale_open_um: float = 48.0      # opening that keeps wide pale areas and drops edge rims
    close_um: float = 32.0          # morphological close diameter
    max_hole_um2: float = 20_000.0   # holes up to 0.02 mm^2 (about one 128 um patch) are filled
    min_region_um2: float = 10_000.0  # regions under 0.01 mm^2 are dropped
    pen_blue_hue: tuple[int, int] = (95, 125)     # OpenCV hue, 0-179 (190-250 degrees)
    pen_blue_saturation_min: int = 120
    pen_green_hue: tuple[int, int] = (35, 90)      # 70-180 degrees
    pen_green_saturation_min: int = 60
    pen_black_value_max: int = 50

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for file metadata)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class TissueMask:
    """A tissue mask (bool, True = tissue) and pen mask at ``mpp`` um/px, plus how it was made."""

    tissue: np.ndarray
    pen: np.ndarray
    mpp: float
    threshold: float
    otsu: float | None

    @property
    def tissue_area_mm2(self) -> float:
        """Tissue area in mm^2."""
        return float(self.tissue.sum()) * self.mpp**2 / 1e6

    @property
    def pen_area_mm2(self) -> float:
        """Area excluded as pen marks, in mm^2."""
        return float(self.pen.sum()) * self.mpp**2 / 1e6


def _odd(n: float) -> int:
    n = max(1, round(n))
    return n if n % 2 else n + 1


def pen_mask(rgb: np.ndarray, params: MaskParams = MaskParams()) -> np.ndarray:
    """Pixels of blue, green or black ink (bool), cleaned of isolated pixels and slightly dilated."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    blue = ((h >= params.pen_blue_hue[0]) & (h <= params.pen_blue_hue[1])
            & (s >= params.pen_blue_saturation_min) & (v > params.pen_black_value_max))
    green = ((h >= params.pen_green_hue[0]) & (h <= params.pen_green_hue[1])
             & (s >= params.pen_green_saturation_min) & (v > params.pen_black_value_max))
    black = v <= params.pen_black_value_max
    pen = (blue | green | black).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3))
    pen = cv2.morphologyEx(pen, cv2.MORPH_OPEN, kernel)
    pen = cv2.dilate(pen, kernel, iterations=1)  # ink edges fade into lighter halos
    return pen.astype(bool)


def _otsu(values: np.ndarray) -> float | None:
    if values.size == 0 or values.min() == values.max():
        return None
    t, _ = cv2.threshold(values.reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(t)


def _fill_small_holes(mask: np.ndarray, max_px: int) -> np.ndarray:
    # Holes are background components that do not touch the border.
    n, labels, stats, _ = cv2.connectedComponentsWithStats((~mask).astype(np.uint8), connectivity=4)
    if n <= 1:
        return mask
    h, w = mask.shape
    x, y, bw, bh, area = (stats[:, i] for i in range(5))
    inner = (x > 0) & (y > 0) & (x + bw < w) & (y + bh < h)
    fill = inner & (area <= max_px)
    fill[0] = False  # label 0 is the tissue itself
    return mask | fill[labels]


def _drop_small_regions(mask: np.ndarray, min_px: int) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return mask
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    return keep[labels]


def tissue_mask(rgb: np.ndarray, mpp: float, params: MaskParams = MaskParams()) -> TissueMask:
    """Tissue mask of an RGB uint8 image whose pixels are ``mpp`` um wide (see module docstring)."""
    rgb = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
    pen = pen_mask(rgb, params)
    saturation = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    saturation = cv2.medianBlur(saturation, min(_odd(params.median_um / mpp), 255))
    otsu = _otsu(saturation[~pen])
    threshold = float(np.clip(otsu if otsu is not None else params.saturation_max,
                              params.saturation_min, params.saturation_max))
    mask = (saturation > threshold) & ~pen
    if threshold > params.pale_saturation_min:
        pale = ((saturation > params.pale_saturation_min) & ~mask & ~pen).astype(np.uint8)
        size = _odd(params.pale_open_um / mpp)
        if size > 1:
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
            pale = cv2.morphologyEx(pale, cv2.MORPH_OPEN, kernel)
        mask |= pale.astype(bool)
    size = _odd(params.close_um / mpp)
    if size > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
        mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)
    mask = _fill_small_holes(mask, int(params.max_hole_um2 / mpp**2))
    mask &= ~pen
    mask = _drop_small_regions(mask, max(1, int(params.min_region_um2 / mpp**2)))
    return TissueMask(tissue=mask, pen=pen, mpp=mpp, threshold=threshold, otsu=otsu)


def box_fractions(mask: np.ndarray, x0: np.ndarray, y0: np.ndarray, size: float) -> np.ndarray:
    """Fraction of each square box (top-left ``x0``, ``y0``, side ``size``, in mask pixels, may be
    fractional) covered by True pixels of ``mask``; area outside the mask counts as not covered."""
    table = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_64F)  # (h+1, w+1), table[0, :] = 0
    h, w = mask.shape

    def integral(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        # The integral of a piecewise-constant image is bilinear between table corners: exact.
        x = np.clip(x, 0, w)
        y = np.clip(y, 0, h)
        xi = np.minimum(np.floor(x).astype(np.int64), w - 1)
        yi = np.minimum(np.floor(y).astype(np.int64), h - 1)
        fx, fy = x - xi, y - yi
        return (table[yi, xi] * (1 - fx) * (1 - fy) + table[yi, xi + 1] * fx * (1 - fy)
                + table[yi + 1, xi] * (1 - fx) * fy + table[yi + 1, xi + 1] * fx * fy)

    x0 = np.asarray(x0, dtype=np.float64)
    y0 = np.asarray(y0, dtype=np.float64)
    x1, y1 = x0 + size, y0 + size
    total = integral(x1, y1) - integral(x0, y1) - integral(x1, y0) + integral(x0, y0)
    return np.clip(total / (size * size), 0.0, 1.0)
