"""Which files in a cohort's slides folder are slides: one rule for the workflow and the omics join.

Standard library only, because the Snakefile calls it while it builds the DAG. Subfolders are
searched too, since the GDC Data Transfer Tool saves every TCGA file in a folder named by its file
UUID (``slides/<uuid>/TCGA-...-DX1.<uuid>.svs``); a flat folder of files or of links to files works
the same way. Outputs are named by slide stem, so two slide files with one stem are an error;
:func:`slide_stem` gives the same stem for a slide named in an omic table or a slide list.
"""

from __future__ import annotations

import os
from pathlib import Path

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif")


class SlideFolderError(ValueError):
    """The slides folder is missing, or two of its slide files share a stem (the message says which;
    the caller names the folder)."""


def find_slide_files(folder: str | Path) -> dict[str, Path]:
    """Slide stem -> path for every slide file under ``folder`` (hidden files and folders skipped).

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
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            path = Path(here) / name
            if not name.startswith(".") and path.suffix.lower() in SLIDE_SUFFIXES:
                found.setdefault(path.stem, []).append(path)
    clashes = {stem: paths for stem, paths in found.items() if len(paths) > 1}
    if clashes:
        stem, paths = sorted(clashes.items())[0]
        listed = ", ".join(str(p.relative_to(root)) for p in sorted(paths))
        raise SlideFolderError(f"{len(clashes)} slide name(s) occur more than once under the slides folder, "
                               f"e.g. {stem} ({listed}); outputs are named by slide, so keep one")
    return {stem: paths[0] for stem, paths in sorted(found.items())}


def slide_stem(name: str) -> str:
    """A slide file name without its extension (``x.svs`` -> ``x``); a bare stem is returned as is."""
    path = Path(name)
    return path.stem if path.suffix.lower() in SLIDE_SUFFIXES else path.name
