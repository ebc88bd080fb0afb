"""``healnet tile``: tissue mask and MPP-aware patch grid of one slide, plus a QC picture.

The grid is physical: a patch is ``patch_size`` px at ``target_mpp`` um/px, i.e.
``patch_size * target_mpp / mpp`` level-0 px, laid from the slide's top-left corner, whole patches
only. The same tissue scanned at 40x and at 20x therefore gives the same grid in micrometres. Only a
low-resolution level is read (the tissue mask works at ~8 um/px), so tiling a 100,000 px slide takes
about a second. Patches are kept when their tissue fraction (from the mask) reaches
``min_tissue_fraction``.

Output: the tiles Parquet file (:mod:`preprocessing.tiling.tiles`) and, with ``--qc``, a PNG showing the
thumbnail, the tissue outline (green), excluded pen marks (magenta), the kept patches (blue) and,
above or beside it, the slide, MPP and its source, level and patch count; the picture is at most
QC_MAX_HEIGHT px tall. Both are written atomically.

Errors: a slide that cannot be read, or has no usable MPP, is an InputError (one line, exit 1, no
output). With ``--on-error record`` (what the pipeline uses, so one bad slide never stops a cohort)
the same line goes to stderr, but a zero-row tiles file with ``failed: <reason>`` in its metadata
and a QC picture saying FAILED are written, and the exit status is 0. A slide without tissue, or
smaller than one patch, is not an error: zero rows and a ``warning`` in the metadata.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import openslide
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from preprocessing.core.atomic import atomic_output
from preprocessing.core.errors import InputError
from preprocessing.slides.dicom import container_identifier
from preprocessing.slides.files import slide_stem
from preprocessing.slides.reader import (
    LEVEL_TOLERANCE,
    level_for_mpp,
    open_slide,
    patch_size_level0,
    read_level_reduced,
    read_mpp_overrides,
    read_patch,
    resolve_mpp,
)
from preprocessing.tiling.tiles import write_tiles
from preprocessing.tissue import MaskParams, TissueMask, box_fractions, tissue_mask

log = logging.getLogger(__name__)

#: Long side of the thumbnail read for the QC picture (px).
QC_LONG_SIDE = 2000
#: The QC picture fits QC_MAX_WIDTH x QC_MAX_HEIGHT px (the Snakemake report centres images vertically,
#: so a taller picture loses its top), with the text above a landscape thumbnail or in a column of
#: QC_SIDE_WIDTH px beside a portrait one, whichever shows the thumbnail larger; small thumbnails are
#: upscaled (at most QC_MAX_UPSCALE times) to fill it. The picture is at least QC_MIN_WIDTH px wide.
QC_MAX_WIDTH = 1400
QC_MAX_HEIGHT = 900
QC_SIDE_WIDTH = 440
QC_MAX_UPSCALE = 8
QC_MIN_WIDTH = 1000
QC_FONT_SIZE = 18

TISSUE_COLOUR = (0, 170, 0)
PEN_COLOUR = (220, 0, 220)
PATCH_COLOUR = (20, 60, 230)


@dataclass
class TilingResult:
    """Kept patches (x, y, tissue_fraction), file metadata, and the QC picture (None if not asked for)."""

    tiles: pd.DataFrame
    meta: dict[str, Any]
    qc: Image.Image | None = None
    warnings: list[str] = field(default_factory=list)


def mask_level(downsamples: tuple[float, ...] | list[float], mpp: float,
               mask_mpp: float) -> tuple[int, int]:
    """(level, k): read this level and block-average it by k to get a mask near ``mask_mpp``.

    The level is the coarsest one not coarser than ``2 * mask_mpp`` (a 16 um/px level is used as
    is rather than reading 16x more pixels at 4 um/px); k brings it closest to ``mask_mpp``.
    """
    level = level_for_mpp(downsamples, mpp, 2 * mask_mpp, tolerance=0.05)
    level_mpp = mpp * downsamples[level]
    return level, max(1, round(mask_mpp / level_mpp))


def tile_slide(slide_path: str | Path, *, target_mpp: float = 0.5, patch_size: int = 256,
               min_tissue_fraction: float = 0.5, mpp: float | None = None,
               overrides: dict[str, float] | None = None, default_mpp: float | None = None,
               mask_params: MaskParams | None = None, qc: bool = True) -> TilingResult:
    """Tile one slide (see module docstring); InputError for an unreadable slide or unusable MPP."""
    path = Path(slide_path)
    mask_params = mask_params or MaskParams()
    with contextlib.closing(open_slide(path)) as slide:
        try:
            return _tile_open_slide(slide, path, target_mpp=target_mpp, patch_size=patch_size,
                                    min_tissue_fraction=min_tissue_fraction, mpp=mpp, overrides=overrides,
                                    default_mpp=default_mpp, mask_params=mask_params, qc=qc)
        except openslide.OpenSlideError as err:
            raise InputError(path, f"corrupt or unreadable slide: {err}") from None


def _tile_open_slide(slide: openslide.OpenSlide, path: Path, *, target_mpp: float, patch_size: int,
                     min_tissue_fraction: float, mpp: float | None, overrides: dict[str, float] | None,
                     default_mpp: float | None, mask_params: MaskParams, qc: bool) -> TilingResult:
    """:func:`tile_slide` on an opened slide (OpenSlideError propagates)."""
    props = dict(slide.properties)
    resolved = resolve_mpp(props, path, cli_mpp=mpp, overrides=overrides, default_mpp=default_mpp)
    downsamples = tuple(slide.level_downsamples)
    width, height = slide.dimensions
    level = level_for_mpp(downsamples, resolved.mpp, target_mpp)
    ds = downsamples[level]
    p0 = patch_size_level0(patch_size, target_mpp, resolved.mpp)

    # Tissue mask at ~mask_mpp from a low-resolution level (and the QC thumbnail from the same read).
    m_level, k = mask_level(downsamples, resolved.mpp, mask_params.mask_mpp)
    lw, lh = slide.level_dimensions[m_level]
    kq = max(1, math.ceil(max(lw, lh) / QC_LONG_SIDE))
    factors = [k, kq] if qc else [k]
    images = read_level_reduced(slide, m_level, factors)
    mask_ds = downsamples[m_level] * k  # level-0 px per mask px
    mask = tissue_mask(images[0], resolved.mpp * mask_ds, mask_params)

    tiles, cols, rows = _patch_grid(width, height, p0, mask, mask_ds, min_tissue_fraction)
    warnings = _tiling_warnings(width, height, p0, cols * rows, mask, tiles, min_tissue_fraction,
                                target_mpp, resolved.mpp)
    for text in warnings:
        log.warning("%s: %s", path.name, text)

    if not tiles.empty:  # the level patches come from must decode, or extraction fails later
        read_patch(slide, int(tiles.x.iloc[0]), int(tiles.y.iloc[0]),
                   {"level": level, "downsample": ds, "patch_size_level0": p0, "patch_size": patch_size})

    meta: dict[str, Any] = {
        "slide": slide_stem(path),
        "slide_file": path.name,
        "slide_path": str(path.resolve()),
        "vendor": props.get("openslide.vendor"),
        "container_id": container_identifier(props),
        "width": width,
        "height": height,
        "level_count": slide.level_count,
        "level": level,
        "downsample": ds,
        "level_mpp": resolved.mpp * ds,
        "patch_size_level0": p0,
        "patch_size_read": max(1, round(p0 / ds)),
        "patch_size": patch_size,
        "patch_um": p0 * resolved.mpp,
        "target_mpp": target_mpp,
        "mpp": resolved.mpp,
        "mpp_source": resolved.source,
        "mpp_detail": resolved.detail,
        "min_tissue_fraction": min_tissue_fraction,
        "grid_cols": cols,
        "grid_rows": rows,
        "n_patches": len(tiles),
        "tissue_area_mm2": mask.tissue_area_mm2,
        "pen_area_mm2": mask.pen_area_mm2,
        "mask": {"level": m_level, "reduce": k, "downsample": mask_ds, "mpp": mask.mpp,
                 "width": mask.tissue.shape[1], "height": mask.tissue.shape[0],
                 "saturation_threshold": mask.threshold, "otsu": mask.otsu, **mask_params.as_dict()},
        "warning": "; ".join(warnings) or None,
        "failed": None,
        "openslide_version": openslide.__library_version__,
    }
    picture = None
    if qc:
        picture = render_qc(images[-1], downsamples[m_level] * kq, mask, mask_ds, tiles, p0, meta)
    return TilingResult(tiles=tiles, meta=meta, qc=picture, warnings=warnings)


def _patch_grid(width: int, height: int, p0: int, mask: TissueMask, mask_ds: float,
                min_tissue_fraction: float) -> tuple[pd.DataFrame, int, int]:
    """(kept patches, grid columns, grid rows): the physical grid of whole ``p0`` px patches from the
    top-left corner, each patch's tissue fraction read from the mask (``mask_ds`` level-0 px per px)."""
    cols, rows = width // p0, height // p0
    gy, gx = np.mgrid[0:rows, 0:cols]
    xs, ys = (gx.ravel() * p0).astype(np.int64), (gy.ravel() * p0).astype(np.int64)
    fractions = box_fractions(mask.tissue, xs / mask_ds, ys / mask_ds, p0 / mask_ds)
    keep = fractions >= min_tissue_fraction
    tiles = pd.DataFrame({"x": xs[keep], "y": ys[keep],
                          "tissue_fraction": fractions[keep].astype(np.float32)})
    return tiles, cols, rows


def _tiling_warnings(width: int, height: int, p0: int, n_cells: int, mask: TissueMask, tiles: pd.DataFrame,
                     min_tissue_fraction: float, target_mpp: float, mpp: float) -> list[str]:
    """Why a slide gave no patches, or patches worth a look (upsampled, more pen than tissue)."""
    warnings = []
    if n_cells == 0:
        warnings.append(f"slide ({width} x {height} px) is smaller than one patch ({p0} x {p0} level-0 px)")
    elif not mask.tissue.any():
        warnings.append("no tissue found")
    elif tiles.empty:
        warnings.append(f"no patch reaches the minimum tissue fraction {min_tissue_fraction:g}")
    if target_mpp < mpp * (1 - LEVEL_TOLERANCE):
        warnings.append(f"target {target_mpp:g} um/px is finer than the scan ({mpp:.4g} um/px): "
                        "patches are upsampled")
    stained = mask.tissue_area_mm2 + mask.pen_area_mm2
    if mask.pen_area_mm2 > 0.5 * stained > 0:
        warnings.append(f"pen-mark rules excluded {mask.pen_area_mm2:.2f} mm^2, more than the tissue kept; "
                        "check the QC picture")
    return warnings


# ---------------------------------------------------------------------------------------------- QC


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans shipped with matplotlib (covers accented names, µ, ²), else Pillow's default font."""
    spec = importlib.util.find_spec("matplotlib")
    if spec and spec.origin:
        dejavu = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if dejavu.exists():
            return ImageFont.truetype(str(dejavu), size)
    return ImageFont.load_default(size=size)


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to ``width`` px; a word longer than a line (a slide file name) is broken."""
    words: list[str] = []
    for word in text.split():
        while font.getlength(word) > width and len(word) > 1:
            cut = next((i for i in range(len(word) - 1, 0, -1) if font.getlength(word[:i]) <= width), 1)
            words.append(word[:cut])
            word = word[cut:]
        words.append(word)
    lines: list[str] = []
    for word in words:
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _text_height(lines: list[tuple[str, tuple[int, int, int]]], width: int, size: int) -> int:
    """Height (px) of ``lines`` wrapped to a column ``width`` px wide (as drawn by ``_draw_lines``)."""
    font = _font(size)
    return 10 + (size + 6) * sum(len(_wrap(text, font, width - 20)) for text, _ in lines)


def _draw_lines(canvas: Image.Image, lines: list[tuple[str, tuple[int, int, int]]], x: int, y: int,
                width: int, size: int) -> None:
    """Draw ``lines`` (text, colour) wrapped to a column ``width`` px wide, from (``x``, ``y``)."""
    font = _font(size)
    draw = ImageDraw.Draw(canvas)
    wrapped = [(part, colour) for text, colour in lines for part in _wrap(text, font, width - 20)]
    for i, (text, colour) in enumerate(wrapped):
        draw.text((x + 10, y + 6 + i * (size + 6)), text, fill=colour, font=font)


def _with_title(image: Image.Image, lines: list[tuple[str, tuple[int, int, int]]],
                size: int = QC_FONT_SIZE) -> Image.Image:
    """Put ``lines`` (text, colour) in a white band above ``image``."""
    width = max(image.width, QC_MIN_WIDTH)
    band = _text_height(lines, width, size)
    canvas = Image.new("RGB", (width, band + image.height), "white")
    canvas.paste(image, (0, band))
    _draw_lines(canvas, lines, 0, 0, width, size)
    return canvas


def _with_side_text(image: Image.Image, lines: list[tuple[str, tuple[int, int, int]]],
                    size: int = QC_FONT_SIZE) -> Image.Image:
    """Put ``lines`` (text, colour) in a white column right of ``image``."""
    width = max(image.width + QC_SIDE_WIDTH, QC_MIN_WIDTH)
    column = width - image.width
    height = max(image.height, _text_height(lines, column - 10, size))
    canvas = Image.new("RGB", (width, height), "white")
    canvas.paste(image, (0, 0))
    _draw_lines(canvas, lines, image.width + 10, 0, column - 10, size)
    return canvas


def _qc_layout(h: int, w: int, lines: list[tuple[str, tuple[int, int, int]]]) -> tuple[bool, float]:
    """(text beside the thumbnail?, thumbnail scale factor) that shows an ``h`` x ``w`` thumbnail the
    largest within QC_MAX_WIDTH x QC_MAX_HEIGHT."""
    # Text above: the band's height depends on the picture's width (wrapping), so settle it twice.
    top = min(QC_MAX_UPSCALE, QC_MAX_WIDTH / w, QC_MAX_HEIGHT / h)
    for _ in range(2):
        band = _text_height(lines, max(round(w * top), QC_MIN_WIDTH), QC_FONT_SIZE)
        top = min(QC_MAX_UPSCALE, QC_MAX_WIDTH / w, max(1, QC_MAX_HEIGHT - band) / h)
    side = min(QC_MAX_UPSCALE, (QC_MAX_WIDTH - QC_SIDE_WIDTH) / w, QC_MAX_HEIGHT / h)
    return (True, side) if side > top * 1.05 else (False, top)


def render_qc(thumbnail: np.ndarray, thumb_ds: float, mask: TissueMask, mask_ds: float,
              tiles: pd.DataFrame, p0: int, meta: dict[str, Any]) -> Image.Image:
    """QC picture: ``thumbnail`` (``thumb_ds`` level-0 px per px) with the tissue outline, pen marks,
    kept patch rectangles and a title (slide, MPP + source, level, patch count, warnings) above or
    beside it; the whole picture fits QC_MAX_WIDTH x QC_MAX_HEIGHT px."""
    lines = [
        (f"{meta['slide_file']}", (0, 0, 0)),
        (f"MPP {meta['mpp']:.4g} um/px from {meta['mpp_source']} ({meta['mpp_detail']}); read level "
         f"{meta['level']} (downsample {meta['downsample']:.4g}, {meta['level_mpp']:.3g} um/px)", (0, 0, 0)),
        (f"{meta['n_patches']} patches of {meta['patch_size']} px at {meta['target_mpp']:g} um/px "
         f"({meta['patch_um']:.0f} um, {p0} level-0 px); "
         f"min tissue fraction {meta['min_tissue_fraction']:g}; "
         f"tissue {meta['tissue_area_mm2']:.2f} mm^2", (0, 0, 0)),
        ("green: tissue outline, blue: kept patches, magenta: pen marks (excluded)", (90, 90, 90)),
    ]
    if meta.get("warning"):
        lines.append((f"WARNING: {meta['warning']}", (200, 0, 0)))
    h, w = thumbnail.shape[:2]
    beside, factor = _qc_layout(h, w, lines)
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    img = np.ascontiguousarray(thumbnail)
    if size != (w, h):
        interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
        img = cv2.resize(img, size, interpolation=interpolation)
    scale = thumb_ds * w / size[0]  # level-0 px per picture px
    # Patch rectangles half-transparent, so the tissue under a dense grid stays visible.
    grid = img.copy()
    thickness = 2 if p0 / scale >= 32 else 1
    for x, y in zip(tiles.x.to_numpy(), tiles.y.to_numpy(), strict=True):
        cv2.rectangle(grid, (round(x / scale), round(y / scale)),
                      (round((x + p0) / scale) - 1, round((y + p0) / scale) - 1), PATCH_COLOUR, thickness)
    img = cv2.addWeighted(grid, 0.55, img, 0.45, 0)
    # The mask covers whole mask pixels (possibly past the slide edge): map it onto the picture grid.
    for layer, colour in ((mask.pen, PEN_COLOUR), (mask.tissue, TISSUE_COLOUR)):
        if not layer.any():
            continue
        mh, mw = layer.shape
        crop_w = min(mw, math.ceil(size[0] * scale / mask_ds))
        crop_h = min(mh, math.ceil(size[1] * scale / mask_ds))
        part = layer[:crop_h, :crop_w].astype(np.uint8)
        target = (max(1, round(crop_w * mask_ds / scale)), max(1, round(crop_h * mask_ds / scale)))
        resized = cv2.resize(part, target, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(resized, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(img, contours, -1, colour, 2)
    picture = Image.fromarray(img)
    return _with_side_text(picture, lines) if beside else _with_title(picture, lines)


def render_failed_qc(slide: str | Path, reason: str) -> Image.Image:
    """QC picture for a slide that could not be tiled: FAILED, the slide name and the reason."""
    font = _font(48)
    blank = Image.new("RGB", (QC_MIN_WIDTH, 120), (245, 245, 245))
    ImageDraw.Draw(blank).text((20, 30), "FAILED", fill=(200, 0, 0), font=font)
    return _with_title(blank, [(f"{Path(slide).name}: FAILED", (200, 0, 0)), (reason, (0, 0, 0))], size=20)


def write_png(path: str | Path, image: Image.Image) -> Path:
    """Write ``image`` as PNG atomically."""
    with atomic_output(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


# --------------------------------------------------------------------------------------------- CLI


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``healnet tile`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="healnet tile",
        description="Tissue mask and MPP-aware patch grid of one slide (tiles Parquet), plus a QC picture.")
    parser.add_argument("slide", type=Path, help="whole-slide image: a file (SVS, OME-TIFF, TIFF, any format "
                        "OpenSlide reads) or a DICOM WSI series' folder")
    parser.add_argument("-o", "--output", type=Path, required=True, help="tiles Parquet file to write")
    parser.add_argument("--qc", type=Path, help="QC picture (PNG) to write")
    parser.add_argument("--target-mpp", type=_positive_float, default=0.5,
                        help="patch resolution in um/px (default 0.5)")
    parser.add_argument("--patch-size", type=_positive_int, default=256,
                        help="patch side in px at target MPP (default 256)")
    parser.add_argument("--mpp", type=_positive_float, help="this slide's um/px: overrides everything else")
    parser.add_argument("--min-tissue-fraction", type=_fraction, default=0.5,
                        help="keep patches with at least this tissue fraction (default 0.5)")
    parser.add_argument("--mpp-overrides", type=Path, metavar="CSV",
                        help="per-slide MPP table (columns slide,mpp; slide = file name or stem)")
    parser.add_argument("--default-mpp", type=_positive_float, help="um/px when the slide has no usable MPP")
    parser.add_argument("--on-error", choices=("fail", "record"), default="fail",
                        help="fail: exit 1 on an unreadable slide; record: write a zero-row tiles file "
                             "marked failed (and a FAILED QC picture) and exit 0")
    return parser


def cli(argv: list[str] | None = None) -> int:
    """Run ``healnet tile``; returns the exit status (InputError propagates in ``fail`` mode)."""
    args = build_parser().parse_args(argv)
    # Problems with the arguments themselves always fail: they are not about this one slide.
    overrides = read_mpp_overrides(args.mpp_overrides) if args.mpp_overrides else None
    try:
        result = tile_slide(args.slide, target_mpp=args.target_mpp, patch_size=args.patch_size,
                            min_tissue_fraction=args.min_tissue_fraction, mpp=args.mpp, overrides=overrides,
                            default_mpp=args.default_mpp, qc=args.qc is not None)
    except Exception as err:
        if args.on_error != "record":
            raise
        if isinstance(err, InputError):
            reason = err.reason
        else:
            log.exception("unexpected error tiling %s", args.slide)
            reason = f"{type(err).__name__}: {err}"
        print(f"healnet tile: error: {args.slide}: {reason}", file=sys.stderr)
        meta = {
            "slide": slide_stem(args.slide), "slide_file": args.slide.name,
            "slide_path": str(args.slide.resolve()),
            "failed": reason, "level": None, "downsample": None, "patch_size_level0": None,
            "patch_size": args.patch_size, "target_mpp": args.target_mpp, "mpp": None, "mpp_source": None,
            "min_tissue_fraction": args.min_tissue_fraction, "n_patches": 0, "warning": None,
        }
        write_tiles(args.output, pd.DataFrame(columns=["x", "y", "tissue_fraction"]), meta)
        if args.qc:
            write_png(args.qc, render_failed_qc(args.slide, reason))
        return 0
    # the tiles file first: an output path that cannot take it must not leave a QC picture behind
    write_tiles(args.output, result.tiles, result.meta)
    if result.qc is not None:
        write_png(args.qc, result.qc)
    meta = result.meta
    log.info("%s: %d patches (%.4g um/px from %s, level %d), tissue %.2f mm^2", args.slide.name,
             meta["n_patches"], meta["mpp"], meta["mpp_source"], meta["level"], meta["tissue_area_mm2"])
    return 0
