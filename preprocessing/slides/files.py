"""Which files in a cohort's slides folder are slides: one rule for the workflow and the omics join.

Standard library only, because the Snakefile calls it while it builds the DAG. Subfolders are
searched too, since the GDC Data Transfer Tool saves every TCGA file in a folder named by its file
UUID (``slides/<uuid>/TCGA-...-DX1.<uuid>.svs``); a flat folder of files or of links to files works
the same way. A folder holding DICOM files (``.dcm``) is one DICOM WSI series, i.e. one slide named
by the folder (its files are not searched further). Outputs are named by slide name (the file name
without its extension, ``.ome.tif`` counting as one extension), so two slides with one name are an
error; :func:`slide_stem` gives the same name for a slide named in an omic table or a slide list.
"""

from __future__ import annotations

import os
from pathlib import Path

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif")
#: the file suffix of the instances of a DICOM WSI series (one folder per slide)
DICOM_SUFFIX = ".dcm"
#: the inner suffix of OME-TIFF files (``slide.ome.tif``), part of the extension
OME_SUFFIX = ".ome"


class SlideFolderError(ValueError):
    """The slides folder is missing, or two of its slides share a name (the message says which; the
    caller names the folder)."""


def _is_dicom_name(name: str) -> bool:
    """Whether a file name is a (visible) DICOM instance's."""
    return not name.startswith(".") and Path(name).suffix.lower() == DICOM_SUFFIX


def dicom_instances(folder: str | Path) -> list[Path]:
    """The DICOM files (``*.dcm``, hidden ones skipped) directly in ``folder``, sorted by name; none
    for a path that is not a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir() if _is_dicom_name(f.name) and f.is_file())


def is_dicom_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder with at least one DICOM file (``*.dcm``) directly in it."""
    return bool(dicom_instances(path))


def find_slide_files(folder: str | Path) -> dict[str, Path]:
    """Slide name -> path for every slide under ``folder`` (a file, or a DICOM series' folder);
    hidden files and folders are skipped.

    Links to folders are followed once each, so a loop of links cannot hang the listing.
    """
    root = Path(folder)
    if not root.is_dir():
        raise SlideFolderError("the slides folder does not exist")
    found: dict[str, list[Path]] = {}
    seen: set[str] = set()
    for here, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        visible = [name for name in files if not name.startswith(".")]
        dicom = any(_is_dicom_name(n) for n in visible)
        if dicom and Path(here) == root:
            raise SlideFolderError("DICOM files straight in the slides folder: put each DICOM series "
                                   "in a folder of its own, named by its slide")
        if dicom:
            dirs[:] = []  # a DICOM series: the folder is the slide
            found.setdefault(Path(here).name, []).append(Path(here))
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in visible:
            path = Path(here) / name
            if path.suffix.lower() in SLIDE_SUFFIXES:
                found.setdefault(slide_stem(name), []).append(path)
    clashes = {stem: paths for stem, paths in found.items() if len(paths) > 1}
    if clashes:
        stem, paths = sorted(clashes.items())[0]
        listed = ", ".join(str(p.relative_to(root)) for p in sorted(paths))
        raise SlideFolderError(f"{len(clashes)} slide name(s) occur more than once under the slides folder, "
                               f"e.g. {stem} ({listed}); outputs are named by slide, so keep one")
    return {stem: paths[0] for stem, paths in sorted(found.items())}


def slide_stem(name: str | Path) -> str:
    """A slide's name: the file name without its extension (``x.svs`` -> ``x``, ``x.ome.tif`` ->
    ``x``); a DICOM series' folder name, or a bare stem, is returned as is."""
    path = Path(name)
    if path.suffix.lower() not in SLIDE_SUFFIXES:
        return path.name
    stem = Path(path.stem)
    return stem.stem if stem.suffix.lower() == OME_SUFFIX else stem.name
