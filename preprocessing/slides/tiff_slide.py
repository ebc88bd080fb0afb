"""TIFF slides OpenSlide does not read fully: OME-TIFF pyramids and flat (single-level) TIFFs.

OpenSlide sees only the top-level image directories of a TIFF, so an OME-TIFF pyramid kept in
SubIFDs shows it one level, and it refuses a TIFF stored in strips rather than tiles. tiffslide
(tifffile and zarr underneath) reads both: the levels of the first image series, and any region of
a level by decoding only the tiles or strips under it, so a large flat TIFF is never loaded whole.

:class:`TiffHandle` puts tiffslide behind the part of OpenSlide's interface this package uses
(sizes, ``properties``, ``read_region`` giving RGBA with transparent pixels outside the image,
``get_thumbnail``, ``close``) and turns tiffslide's errors into ``openslide.OpenSlideError``, so the
tiler and the patch readers treat both alike. ``properties`` holds OpenSlide's names where they
apply (``openslide.vendor`` is ``ome-tiff`` or ``tiff``), the TIFF resolution tags, and the OME-XML
physical pixel size as ``ome.PhysicalSizeX``/``ome.PhysicalSizeXUnit`` (and Y), parsed with
ome-types; an OME-XML that does not parse leaves its reason in ``ome.error`` (the MPP chain of
:mod:`preprocessing.slides.reader` reports it when it needs the size).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import tifffile
import tiffslide
from PIL import Image

#: TIFF suffixes that may hold an OME-TIFF (the OME-XML in the first page's description decides)
TIFF_SUFFIXES = (".tif", ".tiff")
_RESOLUTION_UNITS = {2: "inch", 3: "centimeter"}


def is_tiff(path: str | Path) -> bool:
    """Whether ``path`` has a TIFF suffix."""
    return Path(path).suffix.lower() in TIFF_SUFFIXES


def is_ome_tiff(path: str | Path) -> bool:
    """Whether ``path`` is a TIFF whose first page carries OME-XML (False for anything unreadable)."""
    if not is_tiff(path):
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            return bool(tif.is_ome)
    except Exception:  # noqa: BLE001 - not a TIFF tifffile can parse: not an OME-TIFF
        return False


class TiffHandle:
    """An OpenSlide-like handle on a TIFF read with tiffslide (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self._filename = str(path)
        try:
            self._slide = tiffslide.TiffSlide(path)
        except Exception as err:  # noqa: BLE001 - tifffile raises many types for a bad file
            raise openslide.OpenSlideError(f"tifffile cannot read it ({type(err).__name__}: {err})") from None
        tif = self._slide.ts_tifffile
        self.properties: dict[str, str] = {"openslide.vendor": "ome-tiff" if tif.is_ome else "tiff"}
        self.properties.update(_resolution_tags(tif.series[0].levels[0].keyframe))
        if tif.is_ome:
            self.properties.update(ome_pixel_size(tif.ome_metadata or ""))

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._slide.dimensions

    @property
    def level_count(self) -> int:
        return self._slide.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(self._slide.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(self._slide.level_downsamples)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """RGBA of ``size`` px at ``level`` from level-0 ``location``; transparent outside the image."""
        try:
            rgb = np.asarray(self._slide.read_region(location, level, size, as_array=True))
        except Exception as err:  # noqa: BLE001 - decoding errors come from tifffile and imagecodecs
            raise openslide.OpenSlideError(f"cannot read level {level} at {location}: "
                                           f"{type(err).__name__}: {err}") from None
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[..., None], 3, axis=2)
        rgba = np.zeros((size[1], size[0], 4), np.uint8)
        rgba[..., :3] = rgb[:size[1], :size[0], :3]
        ds = self.level_downsamples[level]
        width, height = self.level_dimensions[level]
        left, top = round(location[0] / ds), round(location[1] / ds)
        inside_x = slice(max(0, -left), max(0, min(size[0], width - left)))
        inside_y = slice(max(0, -top), max(0, min(size[1], height - top)))
        rgba[inside_y, inside_x, 3] = 255
        return Image.fromarray(rgba, "RGBA")

    def get_thumbnail(self, size: tuple[int, int]) -> Image.Image:
        """An RGB thumbnail that fits ``size``, from the coarsest level."""
        return self._slide.get_thumbnail(size).convert("RGB")

    def close(self) -> None:
        self._slide.close()

    def __enter__(self) -> TiffHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _resolution_tags(page: Any) -> dict[str, str]:
    """The TIFF resolution tags of ``page`` under OpenSlide's property names, where they are set."""
    tags = page.tags
    unit = _RESOLUTION_UNITS.get(int(tags["ResolutionUnit"].value)) if "ResolutionUnit" in tags else None
    if unit is None or "XResolution" not in tags:
        return {}
    found = {"tiff.ResolutionUnit": unit}
    for axis in ("X", "Y"):
        if f"{axis}Resolution" in tags:
            numerator, denominator = tags[f"{axis}Resolution"].value
            found[f"tiff.{axis}Resolution"] = repr(numerator / denominator) if denominator else "0"
    return found


def ome_pixel_size(xml: str) -> dict[str, str]:
    """``ome.PhysicalSize{X,Y}`` and their units from the first image of an OME-XML document (unset
    where the document has none), or ``ome.error`` saying why it does not parse."""
    import ome_types  # only OME-TIFF slides need it
    from pydantic import ValidationError

    try:
        with warnings.catch_warnings():  # xsdata warns about the value the error below reports
            warnings.simplefilter("ignore")
            pixels = ome_types.from_xml(xml).images[0].pixels
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        reason = "not a value the OME schema allows" if first["type"] == "enum" else first["msg"]
        return {"ome.error": f"OME-XML {field} = {first.get('input')!r}: {reason}"}
    except Exception as err:  # noqa: BLE001 - malformed XML, no image
        return {"ome.error": f"OME-XML does not parse ({type(err).__name__}: {err})"}
    found = {}
    for axis in ("x", "y"):
        value, unit = getattr(pixels, f"physical_size_{axis}"), getattr(pixels, f"physical_size_{axis}_unit")
        if value is not None:
            found[f"ome.PhysicalSize{axis.upper()}"] = repr(float(value))
            found[f"ome.PhysicalSize{axis.upper()}Unit"] = getattr(unit, "value", str(unit))
    return found
