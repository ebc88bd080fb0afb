"""Whole-slide images: open a slide, resolve its micrometres per pixel (MPP), pick a pyramid level,
read regions at a physical size.

:func:`open_slide` opens every format users bring behind OpenSlide's interface:

- files OpenSlide reads (Aperio SVS, generic tiled TIFF, Hamamatsu, MIRAX, Philips, Ventana, ...)
  with ``openslide.OpenSlide``;
- a DICOM WSI series (a folder of ``.dcm`` instances, :mod:`preprocessing.slides.dicom`) with
  OpenSlide too, once the folder is checked to hold one complete series;
- OME-TIFF (its pyramid in SubIFDs or series levels) and TIFFs OpenSlide refuses (stored in strips)
  with tiffslide (:mod:`preprocessing.slides.tiff_slide`).

MPP resolution order (the first source that gives a value wins; its name is recorded as
``mpp_source`` and the property it came from as ``mpp_detail``):

1. ``cli``: the ``--mpp`` value, an explicit override for this one slide.
2. ``overrides``: the per-slide override table (CSV ``slide,mpp``, matched on file name, then stem).
   It ranks right after ``--mpp`` and *above* the slide's metadata on purpose: such a table exists
   because someone checked slides whose metadata is wrong or missing. Ranked below the metadata it
   could only fill gaps (which ``--default-mpp`` already does) and never correct a wrong value.
3. ``dicom``: a DICOM series' pixel spacing (``PixelMeasuresSequence`` ``PixelSpacing``, in mm).
   ``ome``: an OME-TIFF's ``PhysicalSizeX`` / ``PhysicalSizeY`` in their OME-XML unit (one the code
   does not know, such as ``pixel``, is an error rather than a guess).
   ``openslide``: ``openslide.mpp-x`` / ``openslide.mpp-y`` (OpenSlide's normalised reading).
4. ``vendor``: vendor properties OpenSlide passes through (``aperio.MPP``, ``ventana.ScanRes``, ...).
5. ``tiff``: ``tiff.XResolution`` / ``tiff.YResolution`` when ``tiff.ResolutionUnit`` is a real unit
   (centimetre or inch).
6. ``objective``: objective power (``openslide.objective-power``, ``aperio.AppMag``): 10 / power,
   i.e. 40x ~ 0.25 and 20x ~ 0.5 um/px. A scanner-independent guess, hence low in the order.
7. ``default``: the configured ``--default-mpp``.

No source, a value that cannot be parsed, non-square pixels (x and y differ by more than 5 %), or an
implausible value (coarser than 10 or finer than 0.05 um/px) is an :class:`InputError` naming the
slide, the source and the fix (``--mpp`` or an override table entry).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import openslide
import pandas as pd

from preprocessing.core.errors import InputError
from preprocessing.slides import dicom
from preprocessing.slides.files import is_dicom_folder
from preprocessing.slides.tiff_slide import TiffHandle, is_ome_tiff, is_tiff

log = logging.getLogger(__name__)

#: Plausible MPP range (um/px): anything outside is metadata garbage, not a microscope.
MPP_MIN, MPP_MAX = 0.05, 10.0
#: x and y MPP may differ by this relative amount before pixels count as non-square.
SQUARE_TOLERANCE = 0.05
#: A level may be this much coarser than the target MPP and still be read (then upsampled slightly).
LEVEL_TOLERANCE = 0.02

_UM_PER_UNIT = {"centimeter": 1e4, "inch": 25400.0}
#: Vendor properties giving um/px directly, as (x property, y property or None, scale to um).
_VENDOR_MPP = (
    ("aperio.MPP", None, 1.0),
    ("ventana.ScanRes", None, 1.0),
    ("mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X",
     "mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_Y", 1.0),
)
_OBJECTIVE = ("openslide.objective-power", "aperio.AppMag", "hamamatsu.SourceLens")
#: a DICOM series' pixel spacing (row, column) in mm, as OpenSlide names it
_DICOM_SPACING = "dicom.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[{}]"
#: micrometres per OME-XML length unit, for the units a slide's pixel size may come in
_UM_PER_OME_UNIT = {"m": 1e6, "dm": 1e5, "cm": 1e4, "mm": 1e3, "µm": 1.0, "nm": 1e-3, "pm": 1e-6,
                    "Å": 1e-4, "in": 25400.0, "thou": 25.4}


@dataclass(frozen=True)
class MppResult:
    """A resolved MPP: the value, the source name (``cli``, ``overrides``, ...) and what it was read from."""

    mpp: float
    source: str
    detail: str


#: what :func:`open_slide` returns: OpenSlide's handle, or tiffslide's behind the same interface
Slide = openslide.OpenSlide | TiffHandle


def open_slide(path: str | Path) -> Slide:
    """Open a slide file or a DICOM series' folder (see the module docstring); a missing,
    unsupported, incomplete or corrupt slide is an InputError."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        if not is_dicom_folder(path):
            raise InputError(path, "a folder without DICOM instances (.dcm files): not a slide")
        slide = _openslide(dicom.check_series(path), path)
        try:
            dicom.check_frames(slide, path)
        except InputError:
            slide.close()
            raise
    elif not path.is_file():
        raise InputError(path, "not a file")
    elif is_ome_tiff(path):
        slide = _tiffslide(path)
    else:
        try:
            slide = _openslide(path, path)
        except InputError:
            if not is_tiff(path):
                raise
            slide = _tiffslide(path)  # e.g. a flat TIFF stored in strips
    width, height = slide.dimensions
    if width <= 0 or height <= 0:
        slide.close()
        raise InputError(path, f"slide has empty level 0 ({width} x {height} px)")
    return slide


def _openslide(file: Path, name: Path) -> openslide.OpenSlide:
    try:
        return openslide.OpenSlide(file)
    except openslide.OpenSlideUnsupportedFormatError:
        raise InputError(name, "not a slide OpenSlide can read (unsupported format, not an image, "
                               "or truncated)") from None
    except openslide.OpenSlideError as err:
        raise InputError(name, f"corrupt or unreadable slide: {err}") from None


def _tiffslide(path: Path) -> TiffHandle:
    try:
        return TiffHandle(path)
    except openslide.OpenSlideError as err:
        raise InputError(path, f"corrupt or unreadable TIFF: {err}") from None


def read_mpp_overrides(path: str | Path) -> dict[str, float]:
    """Read a per-slide MPP table (CSV with columns ``slide``, ``mpp``) into {name: mpp}.

    ``slide`` may be a file name, a stem or a path (only its last component is used). Every row is
    checked: a missing column, an unparsable or non-positive MPP, or one slide listed twice with
    different values is an InputError naming the table.
    """
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype={"slide": str}, skipinitialspace=True)
    except FileNotFoundError:
        raise InputError(path, "MPP override table not found") from None
    except OSError as err:  # a folder, no permission
        raise InputError(path, f"cannot read MPP override table ({err.strerror or err})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read MPP override table as CSV: {err}") from None
    missing = {"slide", "mpp"} - set(table.columns)
    if missing:
        raise InputError(path, f"MPP override table lacks column(s) {sorted(missing)} "
                               f"(found {list(table.columns)}; expected slide,mpp)")
    overrides: dict[str, float] = {}
    for line, (name, value) in enumerate(zip(table["slide"], table["mpp"], strict=True), start=2):
        if not isinstance(name, str) or not name.strip():
            raise InputError(path, f"line {line}: empty slide name")
        try:
            mpp = float(value)
        except (TypeError, ValueError):
            raise InputError(path, f"line {line}: mpp {value!r} is not a number") from None
        if not math.isfinite(mpp) or mpp <= 0:
            raise InputError(path, f"line {line}: mpp {value!r} must be a positive number")
        key = Path(name.strip()).name
        if key in overrides and not math.isclose(overrides[key], mpp):
            raise InputError(path, f"line {line}: slide {key!r} listed twice with different mpp "
                                   f"({overrides[key]:g} and {mpp:g})")
        overrides[key] = mpp
    return overrides


def _number(slide: str | Path, key: str, raw: str) -> float:
    try:
        value = float(str(raw).strip().split()[0])
    except (ValueError, IndexError):
        raise InputError(slide, f"cannot parse {key} = {raw!r} as a number") from None
    return value


def _pair(slide: str | Path, props: Mapping[str, str], kx: str, ky: str | None,
          scale: float = 1.0) -> tuple[float, str] | None:
    """MPP from an x property (and optional y property), checked for square pixels."""
    if kx not in props:
        return None
    x = _number(slide, kx, props[kx]) * scale
    if ky is None or ky not in props:
        return x, f"{kx}={props[kx]}"
    y = _number(slide, ky, props[ky]) * scale
    detail = f"{kx}={props[kx]}, {ky}={props[ky]}"
    if not (math.isfinite(y) and y > 0):  # e.g. mpp-y = 0: a placeholder, not half the pixel size
        return x, f"{detail} (y ignored)"
    return _square(slide, x, y, detail), detail


def _square(slide: str | Path, x: float, y: float, detail: str) -> float:
    """The mean of x and y pixel sizes; an InputError when the pixels are not square."""
    if x > 0 and y > 0 and abs(x - y) > SQUARE_TOLERANCE * min(x, y):
        raise InputError(slide, f"non-square pixels ({detail}): not supported; give --mpp or an "
                                "override table entry if the metadata is wrong")
    return (x + y) / 2


def _vendor(slide: str | Path, props: Mapping[str, str]) -> tuple[float, str] | None:
    for kx, ky, scale in _VENDOR_MPP:
        found = _pair(slide, props, kx, ky, scale)
        if found is not None:
            return found
    if "philips.DICOM_PIXEL_SPACING" in props:  # "0.000243 0.000243" in millimetres (row, column)
        raw = props["philips.DICOM_PIXEL_SPACING"]
        parts = raw.replace('"', " ").split()
        try:
            spacing = [float(p) * 1000 for p in parts[:2]]
        except ValueError:
            raise InputError(slide, f"cannot parse philips.DICOM_PIXEL_SPACING = {raw!r}") from None
        detail = f"philips.DICOM_PIXEL_SPACING={raw}"
        if len(spacing) == 2:
            return _square(slide, spacing[0], spacing[1], detail), detail
        if spacing:
            return spacing[0], detail
    return None


def _dicom(slide: str | Path, props: Mapping[str, str]) -> tuple[float, str] | None:
    """MPP from a DICOM series' pixel spacing (mm; rows first, so y then x)."""
    ky, kx = _DICOM_SPACING.format(0), _DICOM_SPACING.format(1)
    if ky not in props:
        return None
    found = _pair(slide, props, kx if kx in props else ky, ky, scale=1000.0)
    if found is None:
        return None
    return found[0], f"DICOM PixelSpacing {props[ky]}\\{props.get(kx, props[ky])} mm"


def _ome(slide: str | Path, props: Mapping[str, str]) -> tuple[float, str] | None:
    """MPP from an OME-TIFF's OME-XML ``PhysicalSizeX`` / ``PhysicalSizeY`` in their unit."""
    if "ome.error" in props:
        raise InputError(slide, f"{props['ome.error']}; give --mpp or an override table entry")
    if "ome.PhysicalSizeX" not in props:
        return None
    sizes = []
    for axis in ("X", "Y"):
        if f"ome.PhysicalSize{axis}" not in props:
            continue
        unit = props.get(f"ome.PhysicalSize{axis}Unit", "µm")  # the schema's default unit
        if unit not in _UM_PER_OME_UNIT:
            raise InputError(slide, f"OME-XML PhysicalSize{axis}Unit {unit!r} is not a length unit this "
                                    f"code converts ({', '.join(_UM_PER_OME_UNIT)}); give --mpp or an "
                                    "override table entry")
        sizes.append(_number(slide, f"OME-XML PhysicalSize{axis}", props[f"ome.PhysicalSize{axis}"])
                     * _UM_PER_OME_UNIT[unit])
    detail = ", ".join(f"OME-XML PhysicalSize{a}={props[f'ome.PhysicalSize{a}']} "
                       f"{props.get(f'ome.PhysicalSize{a}Unit', 'µm')}" for a in ("X", "Y")
                       if f"ome.PhysicalSize{a}" in props)
    return (_square(slide, sizes[0], sizes[-1], detail), detail)


def _tiff(slide: str | Path, props: Mapping[str, str]) -> tuple[float, str] | None:
    unit = props.get("tiff.ResolutionUnit", "").strip().lower()
    if unit not in _UM_PER_UNIT or "tiff.XResolution" not in props:
        return None
    xres = _number(slide, "tiff.XResolution", props["tiff.XResolution"])
    yres = _number(slide, "tiff.YResolution", props.get("tiff.YResolution", props["tiff.XResolution"]))
    if xres <= 0 or yres <= 0:
        raise InputError(slide, f"TIFF resolution must be positive (XResolution={xres:g}, "
                                f"YResolution={yres:g})")
    x, y = _UM_PER_UNIT[unit] / xres, _UM_PER_UNIT[unit] / yres
    detail = f"tiff.XResolution={xres:g}, tiff.YResolution={yres:g} per {unit}"
    if abs(x - y) > SQUARE_TOLERANCE * min(x, y):
        raise InputError(slide, f"non-square pixels ({detail}): not supported; give --mpp or an "
                                "override table entry if the metadata is wrong")
    return (x + y) / 2, detail


def _objective(slide: str | Path, props: Mapping[str, str]) -> tuple[float, str] | None:
    for key in _OBJECTIVE:
        if key in props:
            power = _number(slide, key, props[key])
            if power <= 0:
                raise InputError(slide, f"objective power {key} = {props[key]!r} must be positive")
            return 10.0 / power, f"{key}={props[key]} (10/power)"
    return None


def resolve_mpp(props: Mapping[str, str], slide: str | Path, *, cli_mpp: float | None = None,
                overrides: Mapping[str, float] | None = None,
                default_mpp: float | None = None) -> MppResult:
    """Resolve um/px for ``slide`` (its path, used for override lookup and messages) from its
    OpenSlide ``props`` and the user's values, in the order given in the module docstring."""
    slide = Path(slide)
    found: tuple[float, str, str] | None = None
    if cli_mpp is not None:
        found = (float(cli_mpp), "cli", f"--mpp {cli_mpp:g}")
    elif overrides and (slide.name in overrides or slide.stem in overrides):
        key = slide.name if slide.name in overrides else slide.stem
        other = overrides.get(slide.stem, overrides[key])
        if not math.isclose(other, overrides[key]):
            raise InputError(slide, f"override table lists both {slide.name!r} ({overrides[key]:g}) and "
                                    f"{slide.stem!r} ({other:g}); keep one")
        found = (overrides[key], "overrides", f"override table entry {key!r}")
    else:
        sources = (
            ("dicom", lambda: _dicom(slide, props)),
            ("ome", lambda: _ome(slide, props)),
            ("openslide", lambda: _pair(slide, props, "openslide.mpp-x", "openslide.mpp-y")),
            ("vendor", lambda: _vendor(slide, props)),
            ("tiff", lambda: _tiff(slide, props)),
            ("objective", lambda: _objective(slide, props)),
        )
        for name, probe in sources:
            hit = probe()
            if hit is not None:
                found = (hit[0], name, hit[1])
                break
        if found is None and default_mpp is not None:
            found = (float(default_mpp), "default", f"--default-mpp {default_mpp:g}")
    if found is None:
        raise InputError(slide, "no MPP: the slide has no resolution metadata (DICOM pixel spacing, "
                                "OME-XML PhysicalSizeX, openslide.mpp-x, vendor MPP, TIFF resolution "
                                "in cm/inch, objective power); give --mpp, an override table entry or "
                                "--default-mpp")
    mpp, source, detail = found
    if not (math.isfinite(mpp) and MPP_MIN <= mpp <= MPP_MAX):
        raise InputError(slide, f"implausible MPP {mpp:g} um/px from {source} ({detail}): expected "
                                f"{MPP_MIN:g} to {MPP_MAX:g}; give --mpp or an override table entry")
    return MppResult(mpp=mpp, source=source, detail=detail)


def level_for_mpp(downsamples: list[float] | tuple[float, ...], mpp: float, target_mpp: float,
                  tolerance: float = LEVEL_TOLERANCE) -> int:
    """The coarsest pyramid level whose resolution is not coarser than ``target_mpp`` (within
    ``tolerance``), so patches are only ever downsampled (or upsampled by at most that much).
    Level 0 when even it is coarser than the target."""
    best = 0
    for level, ds in enumerate(downsamples):
        if mpp * ds <= target_mpp * (1 + tolerance) and ds > downsamples[best]:
            best = level
    return best


def patch_size_level0(patch_size: int, target_mpp: float, mpp: float) -> int:
    """Side of a ``patch_size`` px patch at ``target_mpp`` in level-0 pixels (rounded to whole px)."""
    return max(1, round(patch_size * target_mpp / mpp))


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite an RGBA uint8 image on white (OpenSlide leaves areas outside the scan transparent)."""
    rgba = np.asarray(rgba)
    rgb, alpha = rgba[..., :3], rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.uint16)
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def read_region_rgb(slide: openslide.AbstractSlide, location: tuple[int, int], level: int,
                    size: tuple[int, int]) -> np.ndarray:
    """``slide.read_region`` as an RGB uint8 array (height, width, 3), transparent areas white.
    An OpenSlide decoding error becomes an InputError naming the slide."""
    try:
        region = slide.read_region(location, level, size)
    except openslide.OpenSlideError as err:
        raise InputError(_slide_name(slide), f"cannot read level {level} at {location}: {err}") from None
    return rgba_to_rgb(np.asarray(region))


def _slide_name(slide: Any) -> str:
    return str(getattr(slide, "_filename", None) or getattr(slide, "filename", None) or "slide")


def read_level_reduced(slide: openslide.AbstractSlide, level: int, factors: list[int],
                       max_strip_px: int = 16_000_000) -> list[np.ndarray]:
    """Read a whole pyramid level as RGB, block-averaged by each integer factor in ``factors``.

    Reads in horizontal strips (at most ``max_strip_px`` pixels each), so a large level never sits
    in memory at full resolution. Partial blocks at the right/bottom edge are padded with white.
    """
    width, height = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    step = math.lcm(*factors)
    rows = max(step, (max_strip_px // max(width, 1)) // step * step)
    parts: list[list[np.ndarray]] = [[] for _ in factors]
    for y in range(0, height, rows):
        h = min(rows, height - y)
        strip = read_region_rgb(slide, (0, round(y * ds)), level, (width, h))
        for out, k in zip(parts, factors, strict=True):
            out.append(_block_mean(strip, k))
    return [np.concatenate(p, axis=0) for p in parts]


def _block_mean(image: np.ndarray, k: int) -> np.ndarray:
    if k == 1:
        return image
    h, w = image.shape[:2]
    ph, pw = -h % k, -w % k
    if ph or pw:
        image = cv2.copyMakeBorder(image, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=(255, 255, 255))
    # INTER_AREA with an integer factor is the exact mean of each k x k block.
    return cv2.resize(image, ((w + pw) // k, (h + ph) // k), interpolation=cv2.INTER_AREA)


def read_patch(slide: openslide.AbstractSlide, x: int, y: int, meta: Mapping[str, Any]) -> np.ndarray:
    """Read the patch whose level-0 top-left corner is (x, y), as described by a tiles file's metadata.

    Returns (patch_size, patch_size, 3) uint8 RGB at ``target_mpp``: read from ``meta["level"]``
    (``patch_size_level0 / downsample`` px) and resized. An InputError if the slide's pyramid does
    not match the metadata (the tiles file was made from another slide).
    """
    level = int(meta["level"])
    size = int(meta["patch_size"])
    if level >= slide.level_count:
        raise InputError(_slide_name(slide), f"tiles metadata names level {level} but the slide has "
                                             f"{slide.level_count} level(s)")
    ds = slide.level_downsamples[level]
    if not math.isclose(ds, float(meta["downsample"]), rel_tol=1e-3):
        raise InputError(_slide_name(slide), f"tiles metadata says level {level} has downsample "
                                             f"{meta['downsample']} but the slide's is {ds:g}")
    read = max(1, round(int(meta["patch_size_level0"]) / ds))
    rgb = read_region_rgb(slide, (int(x), int(y)), level, (read, read))
    if read != size:
        interp = cv2.INTER_AREA if read > size else cv2.INTER_LINEAR
        rgb = cv2.resize(rgb, (size, size), interpolation=interp)
    return rgb
