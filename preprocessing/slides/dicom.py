"""DICOM WSI series: one folder of ``.dcm`` instances per slide, checked, then read with OpenSlide.

OpenSlide 4 reads a DICOM WSI series given any one of its instance files, finding the others in the
same folder; it does not say when one is missing or cut short, and without the full-resolution
instance it silently serves the next level as level 0. :func:`check_series` reads every instance's
header (pydicom, no pixel data) and refuses a folder that is not one complete series:

- a file that is not DICOM, or an instance that is not a whole-slide image (VL Whole Slide
  Microscopy Image Storage);
- instances of more than one series (two slides in one folder);
- no ``VOLUME`` instance (only label, overview or thumbnail images);
- a gap in the instance numbers (scanners and converters number a series' instances without gaps,
  so a gap is a file missing from the copy; a missing last instance cannot be seen this way);
- (:func:`check_frames`, once opened) a level whose last frame cannot be read: an instance cut short.

The slide is named by its folder (:mod:`preprocessing.slides.files`); its container identifier
(the slide's label, e.g. a TCGA barcode) is recorded in the tiles metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import openslide

from preprocessing.core.errors import InputError, one_line
from preprocessing.slides.files import DICOM_SUFFIX, dicom_instances

#: SOP class of VL Whole Slide Microscopy Image Storage
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


def _header(path: Path, folder: Path) -> Any:
    import pydicom  # only DICOM slides need it

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as err:  # noqa: BLE001 - pydicom raises InvalidDicomError, EOFError, ...
        raise InputError(folder, f"instance {path.name} is not a readable DICOM file "
                                 f"({one_line(err)})") from None


def check_series(folder: str | Path) -> Path:
    """Check the DICOM series in ``folder`` (see the module docstring); the instance file of its
    finest ``VOLUME`` level, for OpenSlide to open. An InputError naming the folder otherwise."""
    folder = Path(folder)
    files = dicom_instances(folder)
    if not files:
        raise InputError(folder, f"no DICOM instances ({DICOM_SUFFIX} files) in the folder")
    headers = {f: _header(f, folder) for f in files}
    for path, ds in headers.items():
        if str(ds.get("SOPClassUID", "")) != WSI_SOP_CLASS:
            raise InputError(folder, f"instance {path.name} is not a whole-slide image "
                                     f"(SOP class {ds.get('SOPClassUID', 'missing')})")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in headers.values()}
    if len(series) > 1:
        raise InputError(folder, f"instances of {len(series)} series in one folder: keep one slide "
                                 "per folder")
    numbers = sorted(int(ds.InstanceNumber) for ds in headers.values()
                     if ds.get("InstanceNumber") is not None)
    missing = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers)) if numbers else []
    if missing:
        shown = ", ".join(str(n) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise InputError(folder, f"instance number(s) {shown} missing from the series (numbered "
                                 f"{numbers[0]} to {numbers[-1]}): an incomplete copy?")
    volumes = [(int(ds.get("TotalPixelMatrixColumns", 0)), path) for path, ds in headers.items()
               if "VOLUME" in list(ds.get("ImageType", []))]
    if not volumes:
        raise InputError(folder, "no VOLUME instance (only label, overview or thumbnail images)")
    return max(volumes)[1]


def check_frames(slide: openslide.AbstractSlide, folder: str | Path) -> None:
    """Read the last frame of every level (one pixel at its bottom-right corner): an instance cut
    short fails there. An InputError naming the folder and the level."""
    for level, ((width, height), ds) in enumerate(zip(slide.level_dimensions, slide.level_downsamples,
                                                     strict=True)):
        corner = (int((width - 1) * ds), int((height - 1) * ds))
        try:
            slide.read_region(corner, level, (1, 1))
        except openslide.OpenSlideError as err:
            raise InputError(folder, f"level {level} ({width} x {height} px) cannot be read to its end, "
                                     f"an instance cut short? ({one_line(err)})") from None


def container_identifier(props: Mapping[str, str]) -> str | None:
    """A DICOM series' container identifier (the slide's label, e.g. a TCGA barcode) from the slide's
    OpenSlide properties; None for other slides and for a converter's placeholder."""
    value = props.get("dicom.ContainerIdentifier")
    return None if value in (None, "", "Unknown") else str(value)
