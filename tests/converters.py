"""Slides in the formats users bring, made from an SVS as a lab or an archive would make them.

- :func:`dicomize`: a DICOM WSI series (one folder of ``.dcm`` instances) written by wsidicomizer,
  which keeps the slide's JPEG tiles as they are. It runs in the converter's own environment
  (``.venv/dicomizer``, made by ``make test``; see the Makefile): tests skip without it.
- :func:`write_ome_tiff`: an OME-TIFF pyramid written by tifffile, levels in SubIFDs, JPEG tiles,
  the physical pixel size in the OME-XML only (no TIFF resolution tags).
- :func:`write_flat_tiff`: one full-resolution image, tiled or in strips, with TIFF resolution tags.

Re-encoded JPEG is written at quality 95 without chroma subsampling: the pixels differ from the
SVS's by about 0.8 grey levels on average (with 4:2:0 subsampling, 2.6, enough to move features).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import openslide
import pytest
import tifffile

REPO = Path(__file__).resolve().parents[1]
DICOMIZER_PYTHON = REPO / ".venv/dicomizer/bin/python"
JPEG = {"compression": "jpeg", "compressionargs": {"level": 95}, "subsampling": (1, 1), "photometric": "rgb"}


def dicomize(slide: Path, folder: Path, *, thumbnail: bool = True) -> Path:
    """``slide`` as a DICOM WSI series in ``folder`` (skips when the converter is not installed);
    ``thumbnail=False`` for the demo generator's slides (see tests/tools/dicomize.py)."""
    if not DICOMIZER_PYTHON.exists():
        pytest.skip(f"the DICOM converter's environment is missing ({DICOMIZER_PYTHON}; "
                    "`make test` makes it)")
    tool = REPO / "tests/tools/dicomize.py"
    flags = [] if thumbnail else ["--no-thumbnail"]
    done = subprocess.run([str(DICOMIZER_PYTHON), str(tool), str(slide), str(folder), *flags],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "turbojpeg" in done.stderr.lower():
        pytest.skip("wsidicomizer needs the system TurboJPEG library (Debian libturbojpeg0)")
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def instances(folder: Path) -> dict[int, tuple[Path, str]]:
    """Instance number -> (file, image type) of a series :func:`dicomize` wrote."""
    import pydicom

    found = {}
    for path in sorted(folder.glob("*.dcm")):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        found[int(header.InstanceNumber)] = (path, str(header.ImageType[2]))
    return found


def level0_rgb(slide: Path) -> tuple[np.ndarray, float]:
    """The slide's full-resolution image (RGB) and its um/px."""
    with openslide.OpenSlide(slide) as handle:
        rgb = np.asarray(handle.read_region((0, 0), 0, handle.dimensions).convert("RGB"))
        return rgb, float(handle.properties[openslide.PROPERTY_NAME_MPP_X])


def write_ome_tiff(slide: Path, dest: Path, *, size: float | None = None, unit: str | None = "µm",
                   min_side: int = 256) -> Path:
    """``slide`` as a JPEG-tiled OME-TIFF pyramid (halved until a side is below ``min_side`` px); the
    physical pixel size is the slide's own unless ``size`` is given, in ``unit``; ``unit=None``
    writes no physical size at all."""
    rgb, mpp = level0_rgb(slide)
    levels = [rgb]
    while min(levels[-1].shape[:2]) // 2 >= min_side:
        h, w = levels[-1].shape[:2]
        levels.append(cv2.resize(levels[-1], (w // 2, h // 2), interpolation=cv2.INTER_AREA))
    meta: dict[str, Any] = {"axes": "YXS"}
    if unit is not None:
        value = mpp if size is None else size
        meta.update(PhysicalSizeX=value, PhysicalSizeXUnit=unit, PhysicalSizeY=value, PhysicalSizeYUnit=unit)
    with tifffile.TiffWriter(dest, ome=True) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, tile=(256, 256), metadata=meta, **JPEG)
        for level in levels[1:]:
            tif.write(level, subfiletype=1, tile=(256, 256), **JPEG)
    return dest


def write_flat_tiff(slide: Path, dest: Path, *, tiled: bool = True) -> Path:
    """``slide``'s full-resolution image as one TIFF image (JPEG tiles, or lossless strips), with
    its pixel size in the TIFF resolution tags (pixels per centimetre)."""
    rgb, mpp = level0_rgb(slide)
    layout: dict[str, Any] = {"tile": (256, 256), **JPEG} if tiled else {
        "rowsperstrip": 64, "compression": "zlib", "photometric": "rgb"}
    tifffile.imwrite(dest, rgb, resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", **layout)
    return dest
