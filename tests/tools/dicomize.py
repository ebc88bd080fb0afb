"""Convert one slide to a DICOM WSI series with wsidicomizer, keeping its JPEG tiles as they are.

Run with the converter's own environment (``.venv/dicomizer/bin/python tests/tools/dicomize.py
SLIDE FOLDER [--no-thumbnail]``): it writes the series' instances (``.dcm``) into FOLDER and prints
each file with its instance number and image type, one per line. ``--no-thumbnail`` leaves out the
image an SVS keeps as its second page, which wsidicomizer takes for Aperio's (untiled) thumbnail:
the demo generator keeps a tiled pyramid level there.
"""

from __future__ import annotations

import sys

import pydicom
from wsidicomizer import WsiDicomizer


def main(source: str, folder: str, *flags: str) -> int:
    files = WsiDicomizer.convert(source, folder, include_thumbnail="--no-thumbnail" not in flags)
    for name in sorted(files):
        header = pydicom.dcmread(name, stop_before_pixels=True)
        print(name, header.InstanceNumber, "\\".join(header.ImageType))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
