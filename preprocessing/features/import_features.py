"""Patch features made by CLAM or TRIDENT, turned into our feature stores (``healnet import-features``).

    healnet import-features --format clam|trident DIR -o OUTDIR [--encoder NAME] [--slides SLIDES_DIR]
        [--dtype source|float16|float32]

Every ``*.h5`` file in ``DIR`` (or ``DIR`` itself when it is one ``.h5`` file) becomes the store
``OUTDIR/{stem}.zarr`` (:mod:`preprocessing.features.store`), with the same rows in the same order,
so training, scoring and the report read it as they read a store extraction wrote.

What the two tools write (read from their writers):

- CLAM (``extract_features_fp.py``): datasets ``features`` (N x D float32) and ``coords`` (N x 2,
  level-0 top-left corners), no attributes; its *patch* files, and feature files that kept them,
  have on ``coords`` the attributes ``patch_size`` and ``patch_level`` (and ``downsample``): the patch
  size is in pixels of ``patch_level``.
- TRIDENT (``WSI.extract_patch_features``): the same two datasets; ``features`` carries ``name``,
  ``savetodir`` and, in recent versions, ``encoder``; ``coords`` carries ``patch_size`` (at the
  target magnification), ``patch_size_level0``, ``level0_magnification``, ``target_magnification``,
  ``overlap``, ``level0_width`` and ``level0_height``. Missing values are written as the text ``None``.

Checks, each a one-line error naming the file: it opens as HDF5; it has both datasets; ``features``
is N x D and ``coords`` N x 2 with the same N; every value is finite; coords are whole, non-negative
pixels (inside the slide with ``--slides``); the patch size at level 0 agrees with the coords'
spacing where that can be checked (:func:`check_spacing`); a TRIDENT file's encoder agrees with
``--encoder``.

Several files: each good file is written (atomically, one store at a time); a bad one writes
nothing for its slide and leaves an earlier store of that slide as it was. When any file is bad the
command lists every bad file with its reason in ``OUTDIR/import-failures.tsv``, logs each, and
ends with one error line and exit status 1 (one bad file: the line names it). A later run that
imports everything removes the list.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing.core.atomic import atomic_output, make_parent, remove_path
from preprocessing.core.errors import InputError, one_line
from preprocessing.features.store import tiles_fingerprint, write_store
from preprocessing.features.weights import sha256_file
from preprocessing.tiling.tiles import invalid_positions

log = logging.getLogger(__name__)

FORMATS = ("clam", "trident")
DTYPES = ("source", "float16", "float32")
FAILURES = "import-failures.tsv"
#: tolerated difference between the patch size and the coords' spacing (level-0 px, and fraction)
SPACING_TOLERANCE = (1.0, 0.01)
#: row or column neighbours needed before "no two patches are neighbours" counts as a mismatch
MIN_GAPS_FOR_SPARSE_CHECK = 64


@dataclass
class Source:
    """One CLAM or TRIDENT file as read: its arrays and the attributes of its two datasets."""

    path: Path
    features: np.ndarray
    coords: np.ndarray
    feature_attrs: dict[str, Any] = field(default_factory=dict)
    coords_attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SlideInfo:
    """What ``--slides`` tells about a slide: level-0 size, level downsamples, MPP, file size."""

    path: Path
    width: int
    height: int
    downsamples: tuple[float, ...]
    mpp: float | None
    mpp_source: str | None


# ---------------------------------------------------------------------------------------------
# reading a file


def attribute_json(value: Any) -> Any:
    """An HDF5 attribute value as JSON: numbers and text as such, arrays as lists, TRIDENT's text
    ``None`` as None, a non-finite float as its text."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return [attribute_json(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, list | tuple):
        return [attribute_json(v) for v in value]
    if isinstance(value, str):
        return None if value == "None" else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, bool | int | float) or value is None:
        return value
    return str(value)


def read_source(path: Path) -> Source:
    """The ``features`` and ``coords`` of one .h5 file and their attributes; InputError naming the file
    when it is not HDF5 or lacks a dataset."""
    import h5py

    try:
        handle = h5py.File(path, "r")
    except Exception as err:  # noqa: BLE001 - any failure to open means an unreadable file
        raise InputError(path, f"not a readable HDF5 file ({one_line(err)})") from None
    with handle:
        arrays = {}
        for name in ("features", "coords"):
            node = handle.get(name)
            if not isinstance(node, h5py.Dataset):
                what = "no" if node is None else "a group, not a"
                raise InputError(path, f"{what} dataset '{name}' (a CLAM or TRIDENT feature file holds "
                                       f"'features' N x D and 'coords' N x 2; it has "
                                       f"{sorted(handle.keys()) or 'nothing'})")
            try:
                arrays[name] = (node[()], {k: attribute_json(v) for k, v in node.attrs.items()})
            except Exception as err:  # noqa: BLE001 - a dataset that does not decode
                raise InputError(path, f"cannot read dataset '{name}' ({one_line(err)})") from None
    (features, feature_attrs), (coords, coords_attrs) = arrays["features"], arrays["coords"]
    return Source(path, np.asarray(features), np.asarray(coords), feature_attrs, coords_attrs)


def check_arrays(src: Source) -> tuple[np.ndarray, np.ndarray]:
    """The features (N x D) and coords (N x 2 int64) of ``src`` once checked; InputError naming the
    file otherwise."""
    feats, coords, path = src.features, src.coords, src.path
    if feats.dtype.kind not in "fiu" or coords.dtype.kind not in "fiu":
        raise InputError(path, f"features ({feats.dtype}) and coords ({coords.dtype}) must be numbers")
    if feats.ndim != 2 or feats.shape[1] == 0:
        hint = " (no patches and no feature width: nothing to import)" if feats.size == 0 else ""
        raise InputError(path, f"features has shape {feats.shape}, expected N x D{hint}")
    if coords.size == 0 and len(feats) == 0:
        coords = coords.reshape(0, 2)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise InputError(path, f"coords has shape {coords.shape}, expected N x 2 (x, y of each patch)")
    if len(coords) != len(feats):
        raise InputError(path, f"coords has {len(coords)} rows but features has {len(feats)}: "
                               f"one coordinate pair per feature row is needed")
    bad = ~np.isfinite(feats).all(axis=1) if feats.dtype.kind == "f" else np.zeros(len(feats), bool)
    if bad.any():
        raise InputError(path, f"{int(bad.sum())} feature row(s) hold NaN or infinity "
                               f"(first: row {int(np.flatnonzero(bad)[0])})")
    xy = coords.astype(np.float64)
    bad = invalid_positions(xy)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InputError(path, f"{int(bad.sum())} coords row(s) are not whole, non-negative level-0 "
                               f"pixels (first: row {first}, {coords[first].tolist()})")
    return feats, xy.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# geometry


def _number(value: Any) -> float | None:
    """A positive finite number from an attribute (first element of a pair), else None."""
    if isinstance(value, list) and value:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def geometry(fmt: str, src: Source, slide: SlideInfo | None) -> dict[str, Any]:
    """Patch size at level 0, the step between neighbouring patches and the magnification, where the
    file (or the slide) says: ``patch_size_level0``, ``stride_level0``, ``patch_size``, ``level``,
    ``downsample``, ``magnification``, ``level0_magnification`` (None when not known)."""
    a = src.coords_attrs
    size = _number(a.get("patch_size"))
    geo: dict[str, Any] = {"patch_size": size, "patch_size_level0": None, "level": None, "downsample": None,
                           "magnification": None, "level0_magnification": None}
    if fmt == "trident":
        src_mag, dst_mag = _number(a.get("level0_magnification")), _number(a.get("target_magnification"))
        geo.update(magnification=dst_mag, level0_magnification=src_mag)
        if src_mag and dst_mag:
            geo["downsample"] = src_mag / dst_mag
        geo["patch_size_level0"] = _number(a.get("patch_size_level0")) or (
            size * geo["downsample"] if size and geo["downsample"] else None)
    else:
        level = a.get("patch_level")
        level = int(level) if isinstance(level, int | float) and not isinstance(level, bool) else None
        down = _number(a.get("downsample"))
        if down is None and level == 0:
            down = 1.0
        if down is None and level is not None and slide and level < len(slide.downsamples):
            down = slide.downsamples[level]
        geo.update(level=level, downsample=down)
        geo["patch_size_level0"] = size * down if size and down else None
    p0, overlap = geo["patch_size_level0"], _number(a.get("overlap")) or 0.0
    geo["stride_level0"] = p0 * (1 - overlap / size) if p0 and size and overlap < size else p0
    if slide and slide.mpp and p0:
        geo["patch_um"] = p0 * slide.mpp
    return geo


def _neighbour_gaps(coords: np.ndarray) -> np.ndarray:
    """Distances between patches next to each other in a row (same y) or a column (same x)."""
    gaps = []
    for along, across in ((0, 1), (1, 0)):
        order = np.lexsort((coords[:, along], coords[:, across]))
        c = coords[order]
        same = c[1:, across] == c[:-1, across]
        step = np.diff(c[:, along])[same]
        gaps.append(step[step > 0])
    return np.concatenate(gaps) if gaps else np.zeros(0, dtype=np.int64)


def check_spacing(path: Path, coords: np.ndarray, stride: float | None) -> None:
    """InputError when the coords contradict the patch size (``stride``: level-0 px between
    neighbouring patches). Patches closer than that would overlap more than the file says: always a
    mismatch. Patches of which no two are neighbours, among at least
    :data:`MIN_GAPS_FOR_SPARSE_CHECK` row and column gaps, mean a patch size from the wrong level."""
    if not stride or len(coords) < 2:
        return
    gaps = _neighbour_gaps(coords)
    if not len(gaps):
        return
    slack = max(SPACING_TOLERANCE[0], SPACING_TOLERANCE[1] * stride)
    closest = int(gaps.min())
    if closest < stride - slack:
        raise InputError(path, f"coords are as close as {closest} px at level 0 but the patch size says "
                               f"{stride:g} px between neighbouring patches: patch size or coords "
                               f"at the wrong level?")
    if len(gaps) >= MIN_GAPS_FOR_SPARSE_CHECK and closest >= 2 * stride - slack:
        raise InputError(path, f"no two patches are neighbours at {stride:g} px (the patch size at "
                               f"level 0); the closest are {closest} px apart: patch size at the "
                               f"wrong level?")


# ---------------------------------------------------------------------------------------------
# one file


def _encoder(fmt: str, src: Source, given: str | None) -> tuple[str | None, str | None]:
    """The encoder's name and where it came from: the TRIDENT file, ``--encoder``, or the TRIDENT
    folder name ``features_<encoder>``."""
    named = src.feature_attrs.get("encoder") if fmt == "trident" else None
    named = str(named) if named not in (None, "") else None
    if named and given and named != given:
        raise InputError(src.path, f"the file says its features come from encoder {named!r}, not "
                                   f"--encoder {given!r}")
    if named:
        return named, "file"
    if given:
        return given, "--encoder"
    folder = src.path.parent.name
    if fmt == "trident" and folder.startswith("features_") and len(folder) > len("features_"):
        return folder[len("features_"):], "folder name"
    return None, None


def import_file(path: Path, out_dir: Path, fmt: str, *, encoder: str | None = None,
                slides: dict[str, Path] | None = None, dtype: str = "source") -> Path:
    """Check one CLAM/TRIDENT file and write its store ``out_dir/{stem}.zarr``; returns the store's path.
    InputError naming the file on any problem (nothing written then)."""
    src = read_source(path)
    feats, coords = check_arrays(src)
    slide = _slide_info(path, slides) if slides is not None else None
    if slide is not None and len(coords):
        far = (coords[:, 0] >= slide.width) | (coords[:, 1] >= slide.height)
        if far.any():
            raise InputError(path, f"{int(far.sum())} patch(es) start outside slide {slide.path.name} "
                                   f"({slide.width} x {slide.height} px), first at {coords[far][0].tolist()}")
    geo = geometry(fmt, src, slide)
    check_spacing(path, coords, geo["stride_level0"])
    name, named_by = _encoder(fmt, src, encoder)
    if name is None:
        log.warning("%s: no encoder named in the file and no --encoder: recorded as unknown", path.name)
    stored = np.dtype(np.float32 if feats.dtype not in (np.float16, np.float32) else feats.dtype)
    stored = stored if dtype == "source" else np.dtype(dtype)
    if stored == np.float16 and len(feats) and np.abs(feats).max() > np.finfo(np.float16).max:
        raise InputError(path, "features exceed the float16 range; import with --dtype float32")
    attrs = {
        "encoder": name, "encoder_source": named_by, "weights": None, "weights_sha256": None,
        "dtype": str(stored), "slide": path.stem,
        "source_format": fmt, "source_file": path.name, "source_path": str(path.resolve()),
        "source_bytes": path.stat().st_size, "source_sha256": sha256_file(path),
        "source_dtype": str(feats.dtype), "source_attrs": {"features": src.feature_attrs,
                                                           "coords": src.coords_attrs},
        "n_tiles": len(coords), "tiles_sha256": tiles_fingerprint(coords), **geo,
        "mpp": slide.mpp if slide else None, "mpp_source": slide.mpp_source if slide else None,
        "slide_bytes": slide.path.stat().st_size if slide else None,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {pkg: importlib.metadata.version(pkg) for pkg in ("h5py", "zarr", "numpy")},
    }
    out = out_dir / f"{path.stem}.zarr"
    write_store(out, feats.astype(stored, copy=False), coords, attrs)
    return out


def _slide_info(path: Path, slides: dict[str, Path]) -> SlideInfo:
    """The slide named like ``path`` in the ``--slides`` folder; InputError naming the .h5 file when
    there is none."""
    import contextlib

    from preprocessing.slides.reader import open_slide, resolve_mpp

    slide_path = slides.get(path.stem)
    if slide_path is None:
        raise InputError(path, f"no slide named {path.stem} in the --slides folder")
    with contextlib.closing(open_slide(slide_path)) as slide:
        try:
            mpp = resolve_mpp(dict(slide.properties), slide_path)
        except InputError:
            mpp = None
        width, height = slide.dimensions
        return SlideInfo(slide_path, int(width), int(height), tuple(slide.level_downsamples),
                         mpp.mpp if mpp else None, mpp.source if mpp else None)


# ---------------------------------------------------------------------------------------------
# a folder


def source_files(source: Path) -> list[Path]:
    """The .h5 files to import: ``source`` itself, or the ``*.h5`` files directly in it (sorted)."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise InputError(source, "no such file or folder")
    files = sorted(p for p in source.iterdir() if p.suffix.lower() == ".h5" and not p.name.startswith("."))
    if not files:
        raise InputError(source, "holds no .h5 files")
    return files


def import_features(source: str | Path, out_dir: str | Path, fmt: str, *, encoder: str | None = None,
                    slides_dir: str | Path | None = None, dtype: str = "source") -> list[Path]:
    """Import every file of ``source`` (see module docstring); returns the stores written. Bad files
    are listed in ``out_dir/import-failures.tsv`` and end it with one InputError after the good
    files are written."""
    if fmt not in FORMATS:
        raise InputError(fmt, f"unknown format; expected one of {', '.join(FORMATS)}")
    source, out_dir = Path(source), Path(out_dir)
    files = source_files(source)
    slides = _slides_index(Path(slides_dir)) if slides_dir is not None else None
    make_parent(out_dir / "x")
    written, failed = [], []
    for path in files:
        try:
            written.append(import_file(path, out_dir, fmt, encoder=encoder, slides=slides, dtype=dtype))
        except InputError as err:
            log.warning("not imported: %s", err)
            failed.append((path, err))
    log.info("%d of %d file(s) imported into %s", len(written), len(files), out_dir)
    if source.is_dir():  # one file (a workflow job per slide): its error line says it all
        _record_failures(out_dir / FAILURES, failed)
    if len(failed) == 1 and len(files) == 1:
        raise failed[0][1]
    if len(failed) == 1:
        path, err = failed[0]
        raise InputError(path, f"{err.reason}; not imported, the other {len(written)} file(s) were "
                               f"(see {out_dir / FAILURES})")
    if failed:
        path, err = failed[0]
        raise InputError(source, f"{len(failed)} of {len(files)} files not imported, listed in "
                                 f"{out_dir / FAILURES} (first: {path.name}: {err.reason}); "
                                 f"the other {len(written)} were")
    return written


def _slides_index(folder: Path) -> dict[str, Path]:
    from preprocessing.slides.files import SlideFolderError, find_slide_files

    try:
        return find_slide_files(folder)
    except SlideFolderError as err:
        raise InputError(folder, str(err)) from None


def _record_failures(path: Path, failed: list[tuple[Path, InputError]]) -> None:
    """Write the list of files not imported (file, reason), or remove an old list when none failed."""
    if not failed:
        remove_path(path)
        return
    with atomic_output(path) as tmp:
        lines = ["file\treason"] + [f"{p}\t{' '.join(e.reason.split())}" for p, e in failed]
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    """The ``healnet import-features`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="healnet import-features",
        description="Turn CLAM or TRIDENT patch-feature .h5 files into feature stores OUTDIR/{slide}.zarr.")
    parser.add_argument("source", type=Path, help="folder of .h5 files (or one .h5 file)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="the tool that wrote the files")
    parser.add_argument("-o", "--out", type=Path, required=True,
                        help="output folder, e.g. features/TCGA-BRCA/uni_v1 (what training's "
                             "--features-dir reads)")
    parser.add_argument("--encoder", help="the encoder's name, recorded in each store (a TRIDENT file "
                                          "that names another encoder is an error)")
    parser.add_argument("--slides", type=Path, help="folder of the slides: checks coords against "
                                                    "each slide and gives CLAM's level-0 patch size "
                                                    "and the MPP")
    parser.add_argument("--dtype", choices=DTYPES, default="source",
                        help="stored feature precision (source: as in the file; float64 becomes float32)")
    return parser


def cli(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``healnet import-features``; returns the exit status."""
    args = build_parser().parse_args(argv)
    import_features(args.source, args.out, args.format, encoder=args.encoder, slides_dir=args.slides,
                    dtype=args.dtype)
    return 0
