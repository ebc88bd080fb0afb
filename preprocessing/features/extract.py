"""Patch embeddings of one slide into a Zarr v3 store (``healnet extract``).

Reads the patches listed in a tiles file (see :mod:`preprocessing.tiling.tiles`) through a torch
DataLoader whose worker processes each open their own slide handle, runs them through an encoder
(:mod:`preprocessing.features.encoders`) and writes the slide's feature store
(:mod:`preprocessing.features.store`: ``features`` N x D, ``coords`` N x 2 in level-0 px, and
attributes that say how they were made), which appears under its final name only once complete.

    healnet extract SLIDE TILES -o OUT.zarr [--encoder efficientnet_lite0|resnet50_trunc|<timm name>]
        [--weights FILE] [--allow-random-weights] [--encoder-file FROZEN.pt] [--batch-size 64]
        [--device auto|cpu|cuda] [--dtype float16|float32] [--workers 1|auto] [--threads N]
        [--max-bad-patch-fraction 0.01] [--stain-norm macenko|vahadane|reinhard --stain-reference IMAGE]
        [--on-slide-error fail|record] [--reader auto|tiles|gpu|openslide]

An existing complete store made from the same tiles (coordinates, level, patch size) with the same
encoder, weights, dtype and stain normalisation is kept (the command says so and exits 0). Zero
tiles, or a tiles file marked ``failed``, give a valid empty store (``failed`` copied into its
attributes). Patches whose pixels cannot be decoded are left out and listed in ``bad_patches``; more
than ``--max-bad-patch-fraction`` of them, or any non-finite feature, fail the slide: an error, or
with ``--on-slide-error record`` an empty store whose ``failed`` attribute gives the reason.
``--reader`` picks how patches are read (:mod:`preprocessing.features.patches`); the ``reader``
attribute records the reader that served the slide and how many patches fell back to OpenSlide.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pandas as pd
import torch
import zarr
from tqdm import tqdm

from preprocessing.core.atomic import make_parent, remove_stale_temporaries
from preprocessing.core.devices import DEVICES, resolve_device
from preprocessing.core.errors import InputError
from preprocessing.core.workers import resolve_workers, workers_argument
from preprocessing.features.encoder_file import load_frozen_encoder
from preprocessing.features.encoders import (
    DEFAULT_ENCODER,
    RANDOM,
    Encoder,
    add_encoder_arguments,
    build_encoder,
)
from preprocessing.features.patch_transforms import STAIN_METHODS, StainNormaliser
from preprocessing.features.patches import (
    BAD,
    FELL_BACK,
    READERS,
    STAIN_SKIPPED,
    PatchDataset,
    make_loader,
    reader_processes,
    single_threaded_opencv,
)
from preprocessing.features.runner import FeatureRunner, usable_cores
from preprocessing.features.store import (
    RowWriter,
    create_store,
    reusable,
    store_attrs,
    tiles_fingerprint,
)
from preprocessing.slides.files import slide_stem
from preprocessing.slides.reader import Slide, open_slide
from preprocessing.tiling.tiles import invalid_positions, read_tiles

log = logging.getLogger(__name__)


def _versions() -> dict[str, str]:
    return {"torch": torch.__version__, "timm": importlib.metadata.version("timm"), "zarr": zarr.__version__,
            "openslide_python": openslide.__version__, "openslide": openslide.__library_version__,
            "numpy": np.__version__}


# ---------------------------------------------------------------------------------------------
# one slide


@dataclass
class ExtractResult:
    """What :func:`extract_slide` did: patches written, bad ones, time spent in the patch loop."""

    out: Path
    n_patches: int
    n_tiles: int
    bad: list[tuple[int, int]] = field(default_factory=list)
    skipped: bool = False
    loop_seconds: float = 0.0
    failed: str | None = None  # why the slide has no patches (on_slide_error="record")

    @property
    def patches_per_second(self) -> float:
        return self.n_tiles / self.loop_seconds if self.loop_seconds > 0 else float("nan")


_REQUIRED_META = ("level", "downsample", "patch_size_level0", "patch_size")


def _load_tiles(tiles: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    if not tiles.is_file():
        raise InputError(tiles, "tiles file not found")
    try:
        frame, meta = read_tiles(tiles)
    except Exception as err:  # noqa: BLE001 - any reader failure means an unusable tiles file
        raise InputError(tiles, f"cannot read tiles table ({type(err).__name__}: {err})") from err
    missing = [c for c in ("x", "y") if c not in frame.columns]
    if missing:
        raise InputError(tiles, f"tiles table lacks column(s) {', '.join(missing)}")
    bad = invalid_positions(frame[["x", "y"]].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        x, y = frame["x"].iloc[row], frame["y"].iloc[row]
        raise InputError(tiles, f"{int(bad.sum())} patch position(s) are not whole non-negative pixel "
                                f"numbers; first at row {row}: x={x}, y={y}")
    return frame, meta


def _check_meta(
    tiles: Path, slide: Path, meta: dict[str, Any], handle: Slide, coords: np.ndarray
) -> int:
    """Validate the tiles metadata and patch positions against the slide; returns the read size in
    level pixels."""
    missing = [k for k in _REQUIRED_META if meta.get(k) is None]
    if missing:
        raise InputError(tiles, f"tiles metadata lacks {', '.join(missing)}")
    if meta.get("slide"):
        made_from = Path(str(meta["slide"])).name
        if made_from not in {slide.name, slide.stem, slide_stem(slide)}:
            raise InputError(tiles, f"tiles were made from slide {made_from!r}, not {slide.name!r}")
    width, height = handle.dimensions
    if len(coords) and (coords[:, 0].max() >= width or coords[:, 1].max() >= height):
        x, y = coords[np.argmax((coords[:, 0] >= width) | (coords[:, 1] >= height))]
        raise InputError(tiles, f"patch at x={x}, y={y} lies outside {slide.name} ({width} x {height} px): "
                                "tile the slide again")
    level = int(meta["level"])
    if not 0 <= level < handle.level_count:
        raise InputError(tiles, f"level {level} not in slide {slide.name} ({handle.level_count} levels)")
    downsample = float(meta["downsample"])
    actual = float(handle.level_downsamples[level])
    if not math.isclose(downsample, actual, rel_tol=0.01):  # the slide was replaced after tiling
        raise InputError(tiles, f"says level {level} has downsample {downsample:.4g}, but {slide.name} has "
                                f"{actual:.4g}: tile the slide again")
    read_size = round(float(meta["patch_size_level0"]) / downsample)
    if read_size < 1:
        raise InputError(tiles, f"patch_size_level0 {meta['patch_size_level0']} is under one pixel "
                                f"at level {level}")
    return read_size


@dataclass
class _LoopResult:
    kept: np.ndarray  # bool per tile: features written
    bad: list[int]  # tile indices whose pixels could not be decoded
    stain_unchanged: int
    seconds: float
    fell_back: int = 0  # patches read by OpenSlide because a tile could not be decoded
    reader: dict[str, Any] = field(default_factory=dict)  # PatchDataset.describe_reader()


def _embed_patches(dataset: PatchDataset, runner: FeatureRunner, writer: RowWriter, *, slide: Path,
                   batch_size: int, workers: int, max_bad_patch_fraction: float,
                   progress: bool) -> _LoopResult:
    """Read, embed and append every patch of ``dataset`` to ``writer``, in tile order."""
    coords = dataset.coords
    result = _LoopResult(np.zeros(len(coords), dtype=bool), [], 0, 0.0)
    max_bad = math.floor(max_bad_patch_fraction * len(coords))
    out_dtype = writer.array.dtype

    def collect(feats: torch.Tensor, indices: np.ndarray) -> None:
        finite = torch.isfinite(feats).all(dim=1)
        if not bool(finite.all()):
            x, y = coords[int(indices[int((~finite).nonzero()[0, 0])])]
            raise InputError(slide, f"non-finite features for the patch at x={x}, y={y}")
        writer.append(feats.cpu().numpy().astype(out_dtype))
        result.kept[indices] = True

    interactive = sys.stderr.isatty()
    bar = tqdm(total=len(coords), unit="patch", desc=slide.name, file=sys.stderr, disable=not progress,
               mininterval=0.5 if interactive else 30, dynamic_ncols=interactive)
    on_gpu = runner.device.type == "cuda"
    # on a GPU two batches queued per reader, so that readers keep reading through the warm-up
    loader = make_loader(dataset, batch_size, workers, pin_memory=on_gpu,
                         prefetch_batches=2 * workers if on_gpu else 4)
    pending: tuple[torch.Tensor, np.ndarray] | None = None
    start = time.perf_counter()
    with bar, single_threaded_opencv():
        batches = iter(loader)  # the reader processes start on their first batches here
        runner.warm_up()
        for images, indices, status in batches:
            status_np, indices_np = status.numpy(), indices.numpy()
            good = status_np != BAD
            result.stain_unchanged += int(((status_np & STAIN_SKIPPED) != 0).sum())
            result.fell_back += int(((status_np & FELL_BACK) != 0).sum())
            if not good.all():
                result.bad.extend(int(i) for i in indices_np[~good])
                if len(result.bad) > max_bad:
                    x, y = coords[result.bad[0]]
                    raise InputError(slide, f"more than {max_bad_patch_fraction:.2%} of {len(coords)} "
                                            f"patches cannot be decoded; first at x={x}, y={y}")
                images = images[torch.from_numpy(good)]
            if len(images):
                # queue this batch before collecting the previous one, so that a GPU never idles
                launched = (runner(images), indices_np[good])
                if pending is not None:
                    collect(*pending)
                pending = launched
            bar.update(len(status_np))
        if pending is not None:
            collect(*pending)
    result.seconds = time.perf_counter() - start
    return result


def extract_slide(slide: str | Path, tiles: str | Path, out: str | Path, *,
                  encoder: str | Encoder = DEFAULT_ENCODER, weights: str | Path | None = None,
                  encoder_file: str | Path | None = None,
                  allow_random_weights: bool = False, batch_size: int = 64, device: str = "auto",
                  dtype: str = "float16", workers: int | str = 1, threads: int | None = None,
                  max_bad_patch_fraction: float = 0.01, stain_norm: str | None = None,
                  stain_reference: str | Path | None = None, progress: bool = True,
                  on_slide_error: str = "fail", reader: str = "auto") -> ExtractResult:
    """Embed every patch listed in ``tiles`` and write the store ``out``; see the module docstring.

    ``encoder`` is a name (built here with ``weights``/``allow_random_weights``) or a built
    :class:`Encoder`. ``encoder_file`` (made by ``healnet encoder`` from the same name and weights)
    replaces building the encoder, on CPU and GPU alike. An existing complete store made the same way
    from the same tiles is kept. ``on_slide_error="record"``: a slide that tiling could read but whose
    patches cannot be embedded (file gone or unreadable, too many undecodable patches) gets a
    complete store without patches whose ``failed`` attribute says why, so that its patient counts
    as having no slide and the cohort's other jobs go on, as tiling does for unreadable slides.
    ``reader``: ``auto``, ``tiles``, ``gpu`` or ``openslide`` (see :class:`PatchDataset`).
    """
    if on_slide_error not in {"fail", "record"}:
        raise InputError("--on-slide-error", f"must be fail or record, got {on_slide_error!r}")
    if reader not in READERS:
        raise InputError("--reader", f"must be one of {', '.join(READERS)}, got {reader!r}")
    if reader == "gpu" and stain_norm:
        raise InputError("--reader", "gpu does not apply stain normalisation: use tiles or auto")
    slide, tiles, out = Path(slide), Path(tiles), Path(out)
    _check_arguments(batch_size, dtype, max_bad_patch_fraction, stain_norm, stain_reference)
    torch_device = resolve_device(device)
    if threads is not None and threads < 1:
        raise InputError("--threads", f"must be at least 1, got {threads}")
    threads = threads or usable_cores()
    workers = resolve_workers(workers, torch_device.type, threads)

    frame, meta = _load_tiles(tiles)
    failed = meta.get("failed")
    coords = frame[["x", "y"]].to_numpy(dtype=np.int64) if not failed else np.zeros((0, 2), np.int64)
    torch.set_num_threads(threads)
    enc = _encoder(encoder, encoder_file, weights, allow_random_weights, torch_device)
    stain = StainNormaliser(stain_norm, stain_reference) if stain_norm else None
    readers = reader_processes(len(coords), batch_size, workers)
    plan = _Plan(slide, enc, stain, torch_device, batch_size, readers, max_bad_patch_fraction, progress,
                 reader)
    attrs = _describe(plan, dtype, tiles, coords, meta)

    make_parent(out)
    remove_stale_temporaries(out)
    if reusable(out, attrs):
        n_done = int(store_attrs(out)["n_patches"])
        log.info("%s is complete for these tiles and weights: skipping (delete it to recompute)", out)
        return ExtractResult(out, n_done, len(coords), skipped=True)
    try:
        if len(coords):
            attrs["read_size"] = _open_and_check(slide, tiles, meta, coords)
        return _write_store(out, plan, coords, attrs, meta)
    except InputError as err:
        if on_slide_error != "record" or err.source != str(slide):
            raise
        log.error("%s; recorded as a slide without patches (on_slide_error: record)", err)
        attrs["failed"] = err.reason
        empty = np.zeros((0, 2), np.int64)
        result = _write_store(out, replace(plan, workers=0, progress=False), empty, attrs, meta)
        return replace(result, n_tiles=len(coords), failed=err.reason)


def _check_arguments(batch_size: int, dtype: str, max_bad_patch_fraction: float, stain_norm: str | None,
                     stain_reference: str | Path | None) -> None:
    """Refuse settings out of range before anything is read."""
    if batch_size < 1:
        raise InputError("--batch-size", f"must be at least 1, got {batch_size}")
    if dtype not in {"float16", "float32"}:
        raise InputError("--dtype", f"unknown feature dtype {dtype!r}: use float16 or float32")
    if not 0 <= max_bad_patch_fraction <= 1:
        raise InputError("--max-bad-patch-fraction", f"must be within [0, 1], got {max_bad_patch_fraction}")
    if (stain_norm is None) != (stain_reference is None):
        raise InputError("--stain-norm", "--stain-norm and --stain-reference go together")


def _encoder(encoder: str | Encoder, encoder_file: str | Path | None, weights: str | Path | None,
             allow_random_weights: bool, device: torch.device) -> Encoder:
    """The encoder given, the one frozen in ``encoder_file`` (checked to be the one asked for), or a
    new one built from its name and weights."""
    if isinstance(encoder, Encoder):
        return encoder
    if encoder_file is None:
        return build_encoder(encoder, weights, allow_random_weights)
    enc = load_frozen_encoder(encoder_file, device)
    same_weights = enc.weights_given == (weights is not None) and (
        weights is None or enc.weights_source == str(weights))
    if enc.name != encoder or not same_weights:
        wanted = str(weights) if weights else "its default weights"
        raise InputError(encoder_file, f"holds encoder {enc.name!r} with weights {enc.weights_source!r}, "
                                       f"not {encoder!r} with {wanted}")
    if enc.weights_source == RANDOM and not allow_random_weights:
        raise InputError(encoder_file, "holds RANDOM weights; pass --allow-random-weights to use them")
    return enc


@dataclass(frozen=True)
class _Plan:
    """How one slide's patches are embedded."""

    slide: Path
    enc: Encoder
    stain: StainNormaliser | None
    device: torch.device
    batch_size: int
    workers: int
    max_bad_patch_fraction: float
    progress: bool
    reader: str = "auto"


def _describe(plan: _Plan, dtype: str, tiles: Path, coords: np.ndarray,
                 meta: dict[str, Any]) -> dict[str, Any]:
    """The attributes that say how the store is made (those in REUSE_KEYS decide its reuse)."""
    slide = plan.slide
    attrs: dict[str, Any] = {
        **plan.enc.describe(), "dtype": dtype,
        "slide": slide.name, "slide_bytes": slide.stat().st_size if slide.is_file() else None,
        "tiles": tiles.name, "n_tiles": len(coords), "tiles_sha256": tiles_fingerprint(coords),
        **{k: meta.get(k) for k in ("target_mpp", "patch_size", "mpp", "mpp_source", "level",
                                    "downsample", "patch_size_level0")},
        "stain_norm": plan.stain.describe() if plan.stain else None,
        "versions": _versions(),
    }
    if meta.get("failed"):
        attrs["failed"] = str(meta["failed"])
    return attrs


def _open_and_check(slide: Path, tiles: Path, meta: dict[str, Any], coords: np.ndarray) -> int:
    """Open the slide and check the tiles against it; returns the read size in level pixels."""
    with contextlib.closing(open_slide(slide)) as handle:
        return _check_meta(tiles, slide, meta, handle, coords)


def _write_store(out: Path, plan: _Plan, coords: np.ndarray, attrs: dict[str, Any],
                 meta: dict[str, Any]) -> ExtractResult:
    """Embed the patches at ``coords`` and write the complete store ``out`` (atomically) with ``attrs``."""
    slide = plan.slide
    started = time.perf_counter()
    with create_store(out, len(coords), plan.enc.feature_dim, attrs["dtype"]) as store:
        loop = _LoopResult(np.zeros(len(coords), dtype=bool), [], 0, 0.0)
        if len(coords):
            loop = _embed_slide(plan, coords, int(meta["level"]), attrs["read_size"], store.rows)
        kept_coords = coords[loop.kept]
        if loop.bad:
            log.warning("%s: %d of %d patches could not be decoded and are left out (first at x=%d, y=%d)",
                        slide.name, len(loop.bad), len(coords), *coords[loop.bad[0]])
        if loop.fell_back:
            log.warning("%s: %d patches read with OpenSlide: their JPEG tiles could not be decoded",
                        slide.name, loop.fell_back)
        if loop.stain_unchanged:
            log.warning("%s: stain normalisation left %d patches unchanged (no stain found)",
                        slide.name, loop.stain_unchanged)
        attrs.update({
            "stain_norm_unchanged_patches": loop.stain_unchanged if plan.stain else None,
            "n_patches": len(kept_coords),
            "bad_patches": {"count": len(loop.bad), "locations": coords[loop.bad].tolist()},
            "reader": {**(loop.reader or {"requested": plan.reader, "name": None}),
                       "fallback_patches": loop.fell_back},
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        })
        store.finish(kept_coords, attrs)
    rate = len(coords) / loop.seconds if loop.seconds else float("nan")
    log.info("%s: %d patches -> %s (%d bad) in %.1f s (%.1f patches/s in the loop)",
             slide.name, len(kept_coords), out, len(loop.bad), time.perf_counter() - started, rate)
    return ExtractResult(out, len(kept_coords), len(coords), [tuple(map(int, coords[i])) for i in loop.bad],
                         loop_seconds=loop.seconds)


def _embed_slide(plan: _Plan, coords: np.ndarray, level: int, read_size: int, rows: RowWriter) -> _LoopResult:
    """Embed every patch at ``coords`` into ``rows`` (closed here) with the plan's encoder and readers."""
    enc = plan.enc
    dataset = PatchDataset(plan.slide, coords, level, read_size, enc.input_size, enc.interpolation,
                           plan.stain, plan.reader, plan.device)
    pad_to = plan.batch_size if plan.device.type == "cuda" else None  # one batch shape on a GPU
    runner = FeatureRunner(enc, plan.device, pad_to=pad_to)
    loop = _embed_patches(dataset, runner, rows, slide=plan.slide, batch_size=plan.batch_size,
                          workers=plan.workers, max_bad_patch_fraction=plan.max_bad_patch_fraction,
                          progress=plan.progress)
    loop.reader = dataset.describe_reader()
    n_written = rows.close()
    if n_written != int(loop.kept.sum()):
        raise RuntimeError(f"{plan.slide}: {n_written} feature rows for {int(loop.kept.sum())} patches")
    return loop


# ---------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    """The ``healnet extract`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="healnet extract",
        description="Patch embeddings of one slide (patches listed in a tiles file) into a Zarr store.")
    parser.add_argument("slide", type=Path, help="whole-slide image (.svs, or any format OpenSlide reads)")
    parser.add_argument("tiles", type=Path, help="tiles Parquet file written by `healnet tile`")
    parser.add_argument("-o", "--out", type=Path, required=True, help="output store, e.g. features/X.zarr")
    add_encoder_arguments(parser)
    parser.add_argument("--encoder-file", type=Path,
                        help="the encoder frozen by `healnet encoder` (saves seconds per slide job)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", choices=list(DEVICES))
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                        help="stored feature precision")
    parser.add_argument("--workers", type=workers_argument, default=1,
                        help="slide-reading worker processes (0: none; auto: on a GPU one per thread but "
                             "one, on CPU 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the model (default: all usable cores)")
    parser.add_argument("--max-bad-patch-fraction", type=float, default=0.01,
                        help="fail when more than this fraction of patches cannot be decoded")
    parser.add_argument("--stain-norm", choices=STAIN_METHODS, help="stain normalisation before the encoder")
    parser.add_argument("--stain-reference", type=Path, help="reference image (PNG/JPEG) for --stain-norm")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--on-slide-error", choices=["fail", "record"], default="fail",
                        help="record: a slide whose patches cannot be read gets a store without patches "
                             "that says why (its patient then has no slide), and the exit status is 0")
    parser.add_argument("--reader", choices=READERS, default="auto",
                        help="how patches are read: tiles (each JPEG tile decoded once, at the scale "
                             "needed), gpu (tiles decoded, assembled and resized on the --device), "
                             "openslide (read_region), auto (gpu on CUDA, else tiles, where the slide "
                             "allows)")
    return parser


def cli(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``healnet extract``; returns the exit status."""
    args = build_parser().parse_args(argv)
    extract_slide(args.slide, args.tiles, args.out, encoder=args.encoder, weights=args.weights,
                  encoder_file=args.encoder_file,
                  allow_random_weights=args.allow_random_weights, batch_size=args.batch_size,
                  device=args.device, dtype=args.dtype, workers=args.workers, threads=args.threads,
                  max_bad_patch_fraction=args.max_bad_patch_fraction, stain_norm=args.stain_norm,
                  stain_reference=args.stain_reference, progress=not args.no_progress,
                  on_slide_error=args.on_slide_error, reader=args.reader)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
