"""Patch embeddings of one slide into a Zarr v3 store (``healnet extract``).

Reads the patches listed in a tiles file (see :mod:`preprocessing.tiling.tiles`) through a torch
DataLoader whose worker processes each open their own slide handle, runs them through an encoder
(:mod:`preprocessing.features.encoders`) and writes ``features`` (N x D) and ``coords`` (N x 2, level-0 px)
with attributes that say how they were made. The store appears under its final name only once
complete (``complete: true`` is its last attribute), so a killed job never leaves one that looks done.

    healnet extract SLIDE TILES -o OUT.zarr [--encoder efficientnet_lite0|resnet50_trunc|<timm name>]
        [--weights FILE] [--allow-random-weights] [--encoder-file FROZEN.pt] [--batch-size 64]
        [--device auto|cpu|cuda] [--dtype float16|float32] [--workers 1|auto] [--threads N]
        [--max-bad-patch-fraction 0.01] [--stain-norm macenko|vahadane|reinhard --stain-reference IMAGE]
        [--on-slide-error fail|record]

An existing complete store made from the same tiles (coordinates, level, patch size) with the same
encoder, weights, dtype and stain normalisation is kept (the command says so and exits 0). Zero
tiles, or a tiles file marked ``failed``, give a valid empty store (``failed`` copied into its
attributes). Patches whose pixels cannot be decoded are left out and listed in ``bad_patches``; more
than ``--max-bad-patch-fraction`` of them, or any non-finite feature, fail the slide: an error, or
with ``--on-slide-error record`` an empty store whose ``failed`` attribute gives the reason. The
training step reads stores with :func:`read_store` and checks them with :func:`is_complete`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pandas as pd
import torch
import zarr
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from preprocessing.core.atomic import atomic_output, make_parent, remove_stale_temporaries
from preprocessing.core.errors import InputError
from preprocessing.core.workers import resolve_workers, workers_argument
from preprocessing.features.encoders import (
    DEFAULT_ENCODER,
    RANDOM,
    STAIN_METHODS,
    Encoder,
    Normalise,
    StainNormaliser,
    add_encoder_arguments,
    build_encoder,
    freeze_model,
    load_frozen_encoder,
    resize_patch,
    rgba_to_rgb,
)
from preprocessing.tiling.tiles import read_tiles

log = logging.getLogger(__name__)

#: rows per chunk of ``features``: a typical bag (a few thousand patches) is one or two chunk reads.
CHUNK_ROWS = 4096
#: per-patch status returned by the loader
OK, BAD, STAIN_SKIPPED = 0, 1, 2
#: attributes that must match for an existing complete store to be reused
REUSE_KEYS = ("encoder", "weights", "weights_sha256", "dtype", "n_tiles", "tiles_sha256", "stain_norm",
              "level", "downsample", "patch_size_level0", "target_mpp", "patch_size")


# ---------------------------------------------------------------------------------------------
# reading patches


class PatchDataset(Dataset):
    """Patches of one slide as uint8 (H, W, 3) tensors at the encoder's input size.

    Each process opens its own OpenSlide handle on first use (handles must not cross a fork). A
    patch whose pixels cannot be decoded comes back blank with status ``BAD``; the handle is then
    reopened, since OpenSlide refuses all further reads on a handle after an error.
    """

    def __init__(self, slide: str | Path, coords: np.ndarray, level: int, read_size: int,
                 out_size: tuple[int, int], interpolation: str = "bicubic",
                 stain: StainNormaliser | None = None) -> None:
        self.slide = str(slide)
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.level = int(level)
        self.read_size = int(read_size)
        self.out_size = (int(out_size[0]), int(out_size[1]))
        self.interpolation = interpolation
        self.stain = stain
        self._handle: openslide.OpenSlide | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.coords)

    def _slide(self) -> openslide.OpenSlide:
        if self._handle is None or self._pid != os.getpid():
            self._handle = openslide.OpenSlide(self.slide)
            self._pid = os.getpid()
        return self._handle

    def _reset(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None

    def read(self, index: int) -> tuple[np.ndarray, int]:
        """One patch as uint8 RGB at the output size, and its status."""
        x, y = (int(v) for v in self.coords[index])
        try:
            region = self._slide().read_region((x, y), self.level, (self.read_size, self.read_size))
        except openslide.OpenSlideError:
            self._reset()
            return np.full((*self.out_size, 3), 255, np.uint8), BAD
        rgb = resize_patch(rgba_to_rgb(np.asarray(region)), self.out_size, self.interpolation)
        if self.stain is not None:
            rgb, normalised = self.stain(rgb)
            if not normalised:
                return rgb, STAIN_SKIPPED
        return rgb, OK

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        rgb, status = self.read(index)
        return torch.from_numpy(np.ascontiguousarray(rgb)), index, status


@contextlib.contextmanager
def single_threaded_opencv() -> Iterator[None]:
    """OpenCV on one thread while reader processes are forked, then as before.

    A forked child cannot use (or even resize) the thread pool of a parent that has used OpenCV in
    parallel: it deadlocks. With one thread OpenCV runs inline and has no pool to inherit.
    """
    import cv2

    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


#: size of the first batch: the model waits for it to be read, so it is kept small
FIRST_BATCH = 8


def batch_indices(n: int, batch_size: int, first: int = FIRST_BATCH) -> list[list[int]]:
    """Tile indices in order, cut into batches; the first one short so that the model starts early."""
    first = min(first, batch_size)
    cuts = [0, *range(first, n, batch_size), n] if n > first else [0, n]
    return [list(range(a, b)) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]


def reader_processes(n: int, batch_size: int, workers: int) -> int:
    """Worker processes worth starting: none when a single batch leaves nothing to overlap."""
    return workers if n > batch_size else 0


def make_loader(dataset: PatchDataset, batch_size: int, workers: int, pin_memory: bool,
                prefetch_batches: int = 4) -> DataLoader:
    """Batches in tile order; ``workers`` reader processes (0: read in this process)."""
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {"prefetch_factor": max(1, math.ceil(prefetch_batches / workers))}
    return DataLoader(dataset, batch_sampler=batch_indices(len(dataset), batch_size), num_workers=workers,
                      pin_memory=pin_memory, **extra)


# ---------------------------------------------------------------------------------------------
# running the model


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; asking for cuda without one is an input error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device", "cuda requested but no CUDA device is available")
    if device not in {"cpu", "cuda"}:
        raise InputError("--device", f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


#: patches per forward pass on CPU: larger batches fall out of the CPU caches and run slower
#: (EfficientNet-Lite0 on 2 cores: 55 patches/s at 16 per pass, 48 at 64)
CPU_MICRO_BATCH = 16


class FeatureRunner:
    """Encoder + normalisation on one device: uint8 NHWC batches in, float32 features out.

    channels_last memory on CPU and GPU; on CPU the model is traced and frozen
    (:func:`preprocessing.features.encoders.freeze_model`, unless it comes frozen from an encoder file); on
    CUDA autocast (bf16 where supported, else fp16) and non-blocking copies from pinned memory.
    ``pad_to`` pads shorter batches with blank patches (dropped from the output), so that the model
    sees a single batch shape: on an H200 each new shape cost 2-3.5 s of one-off set-up in every
    process, and a slide's short first and last batches paid it twice more.
    """

    def __init__(self, encoder: Encoder, device: torch.device, freeze: bool = True,
                 pad_to: int | None = None) -> None:
        self.device = device
        self.pad_to = pad_to
        self.model = encoder.model.to(device).to(memory_format=torch.channels_last).eval()
        self.normalise = Normalise(encoder.mean, encoder.std).to(device)
        self.feature_dim = encoder.feature_dim
        self.input_size = encoder.input_size
        self.amp_dtype: torch.dtype | None = None
        self.frozen = False
        if device.type == "cuda":
            # No cuDNN autotuning: reading bounds extraction (the GPU runs ~20x faster than the
            # readers), and autotuning the first batch of a fresh process took 9.7 s on an H200.
            torch.backends.cudnn.benchmark = False
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif freeze:
            # Frozen (batch norm folded) and optimised for this CPU: 2-3x faster than eager mode.
            frozen = (self.model if isinstance(self.model, torch.jit.ScriptModule)
                      else freeze_model(self.model, encoder.input_size))
            if frozen is not None:
                with torch.inference_mode():
                    self.model, self.frozen = torch.jit.optimize_for_inference(frozen), True

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Features of a uint8 (N, H, W, 3) batch, float32 (N, D) on the runner's device."""
        if self.device.type == "cpu" and len(batch) > CPU_MICRO_BATCH:
            return torch.cat([self(part) for part in batch.split(CPU_MICRO_BATCH)])
        n = len(batch)
        x = batch.to(self.device, non_blocking=True)
        if self.pad_to is not None and n < self.pad_to:
            x = torch.cat([x, x.new_zeros((self.pad_to - n, *x.shape[1:]))])
        x = self.normalise(x)
        if self.amp_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.amp_dtype):
                out = self.model(x)
        else:
            out = self.model(x)
        return out[:n].float()

    def warm_up(self) -> None:
        """Run one blank batch of the padded shape, so that the one-off set-up is done before real
        batches come (nothing to do without ``pad_to``, which extraction sets on a GPU only).

        Called while the reader processes fill their first batches, which hides its cost (3-4 s on
        an H200).
        """
        if self.pad_to is None:
            return
        height, width = self.input_size
        self(torch.zeros((self.pad_to, height, width, 3), dtype=torch.uint8))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ---------------------------------------------------------------------------------------------
# the store


class _RowWriter:
    """Append rows to a 2-D Zarr array one whole chunk at a time (each chunk is written once)."""

    def __init__(self, array: zarr.Array, chunk_rows: int) -> None:
        self.array = array
        self.chunk_rows = chunk_rows
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.written = 0

    def append(self, rows: np.ndarray) -> None:
        if rows.shape[1:] != self.array.shape[1:]:  # zarr would silently keep only the first columns
            raise RuntimeError(f"feature rows of shape {rows.shape[1:]} for a store of "
                               f"{self.array.shape[1:]}")
        self.buffer.append(rows)
        self.buffered += len(rows)
        if self.buffered >= self.chunk_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self.buffer:
            return
        rows = np.concatenate(self.buffer)
        take = len(rows) if final else (len(rows) // self.chunk_rows) * self.chunk_rows
        if take:
            self.array[self.written:self.written + take] = rows[:take]
            self.written += take
        self.buffer = [rows[take:]] if take < len(rows) else []
        self.buffered = len(rows) - take

    def close(self) -> int:
        self._flush(final=True)
        return self.written


def tiles_fingerprint(coords: np.ndarray) -> str:
    """sha256 of the tile coordinates (int64, row order): a rerun with other tiles is not reused."""
    return hashlib.sha256(np.ascontiguousarray(coords, dtype=np.int64).tobytes()).hexdigest()


def is_complete(path: str | Path) -> bool:
    """True when ``path`` is a feature store whose writer finished (``complete`` attribute set)."""
    try:
        group = zarr.open_group(str(path), mode="r")
        if group.attrs.get("complete") is not True:
            return False
        features, coords = group["features"], group["coords"]
        return features.shape[0] == coords.shape[0] == group.attrs.get("n_patches")
    except Exception:  # noqa: BLE001 - anything unreadable is simply not complete
        return False


def read_store(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Load a complete store: (features N x D, coords N x 2 int64, attributes)."""
    if not is_complete(path):
        raise InputError(path, "not a complete feature store (missing, or its writer did not finish)")
    group = zarr.open_group(str(path), mode="r")
    return np.asarray(group["features"][:]), np.asarray(group["coords"][:]), dict(group.attrs)


def _reusable(out: Path, expected: dict[str, Any]) -> bool:
    if not is_complete(out):
        return False
    attrs = dict(zarr.open_group(str(out), mode="r").attrs)
    return all(attrs.get(key) == expected.get(key) for key in REUSE_KEYS)


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
    xy = frame[["x", "y"]].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(xy).all(axis=1) | (xy < 0).any(axis=1) | (xy != np.round(xy)).any(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        x, y = frame["x"].iloc[row], frame["y"].iloc[row]
        raise InputError(tiles, f"{int(bad.sum())} patch position(s) are not whole non-negative pixel "
                                f"numbers; first at row {row}: x={x}, y={y}")
    return frame, meta


def _check_meta(
    tiles: Path, slide: Path, meta: dict[str, Any], handle: openslide.OpenSlide, coords: np.ndarray
) -> int:
    """Validate the tiles metadata and patch positions against the slide; returns the read size in
    level pixels."""
    missing = [k for k in _REQUIRED_META if meta.get(k) is None]
    if missing:
        raise InputError(tiles, f"tiles metadata lacks {', '.join(missing)}")
    if meta.get("slide"):
        made_from = Path(str(meta["slide"])).name
        if made_from not in {slide.name, slide.stem}:
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


def _embed_patches(dataset: PatchDataset, runner: FeatureRunner, writer: _RowWriter, *, slide: Path,
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
            result.stain_unchanged += int((status_np == STAIN_SKIPPED).sum())
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
                  on_slide_error: str = "fail") -> ExtractResult:
    """Embed every patch listed in ``tiles`` and write the store ``out``; see the module docstring.

    ``encoder`` is a name (built here with ``weights``/``allow_random_weights``) or a built
    :class:`Encoder`. ``encoder_file`` (made by ``healnet encoder`` from the same name and weights)
    replaces building the encoder, on CPU and GPU alike. An existing complete store made the same way
    from the same tiles is kept. ``on_slide_error="record"``: a slide that tiling could read but whose
    patches cannot be embedded (file gone or unreadable, too many undecodable patches) gets a
    complete store without patches whose ``failed`` attribute says why, so that its patient counts
    as having no slide and the cohort's other jobs go on, as tiling does for unreadable slides.
    """
    if on_slide_error not in {"fail", "record"}:
        raise InputError("--on-slide-error", f"must be fail or record, got {on_slide_error!r}")
    slide, tiles, out = Path(slide), Path(tiles), Path(out)
    if batch_size < 1:
        raise InputError("--batch-size", f"must be at least 1, got {batch_size}")
    if dtype not in {"float16", "float32"}:
        raise InputError("--dtype", f"unknown feature dtype {dtype!r}: use float16 or float32")
    if not 0 <= max_bad_patch_fraction <= 1:
        raise InputError("--max-bad-patch-fraction", f"must be within [0, 1], got {max_bad_patch_fraction}")
    if (stain_norm is None) != (stain_reference is None):
        raise InputError("--stain-norm", "--stain-norm and --stain-reference go together")
    torch_device = resolve_device(device)
    if threads is not None and threads < 1:
        raise InputError("--threads", f"must be at least 1, got {threads}")
    threads = threads or usable_cores()
    workers = resolve_workers(workers, torch_device.type, threads)

    frame, meta = _load_tiles(tiles)
    failed = meta.get("failed")
    coords = frame[["x", "y"]].to_numpy(dtype=np.int64) if not failed else np.zeros((0, 2), np.int64)
    workers = reader_processes(len(coords), batch_size, workers)
    torch.set_num_threads(threads)

    if isinstance(encoder, Encoder):
        enc = encoder
    elif encoder_file is not None:
        enc = load_frozen_encoder(encoder_file, torch_device)
        same_weights = enc.weights_given == (weights is not None) and (
            weights is None or enc.weights_source == str(weights))
        if enc.name != encoder or not same_weights:
            wanted = str(weights) if weights else "its default weights"
            raise InputError(encoder_file, f"holds encoder {enc.name!r} with weights {enc.weights_source!r}, "
                                           f"not {encoder!r} with {wanted}")
        if enc.weights_source == RANDOM and not allow_random_weights:
            raise InputError(encoder_file, "holds RANDOM weights; pass --allow-random-weights to use them")
    else:
        enc = build_encoder(encoder, weights, allow_random_weights)
    stain = StainNormaliser(stain_norm, stain_reference) if stain_norm else None
    attrs: dict[str, Any] = {
        **enc.describe(), "dtype": dtype,
        "slide": slide.name, "slide_bytes": slide.stat().st_size if slide.is_file() else None,
        "tiles": tiles.name, "n_tiles": len(coords), "tiles_sha256": tiles_fingerprint(coords),
        **{k: meta.get(k) for k in ("target_mpp", "patch_size", "mpp", "mpp_source", "level",
                                    "downsample", "patch_size_level0")},
        "stain_norm": stain.describe() if stain else None,
        "versions": _versions(),
    }
    if failed:
        attrs["failed"] = str(failed)

    make_parent(out)
    remove_stale_temporaries(out)
    if _reusable(out, attrs):
        n_done = int(zarr.open_group(str(out), mode="r").attrs["n_patches"])
        log.info("%s is complete for these tiles and weights: skipping (delete it to recompute)", out)
        return ExtractResult(out, n_done, len(coords), skipped=True)

    try:
        if len(coords) and not slide.is_file():
            raise InputError(slide, "slide file not found")
        if len(coords):
            try:
                handle = openslide.OpenSlide(str(slide))
            except (openslide.OpenSlideError, OSError) as err:
                raise InputError(slide, f"cannot open slide ({err})") from err
            with handle:
                attrs["read_size"] = _check_meta(tiles, slide, meta, handle, coords)
        return _write_store(out, slide, coords, attrs, enc, meta, stain, torch_device, batch_size=batch_size,
                            workers=workers, max_bad_patch_fraction=max_bad_patch_fraction, progress=progress)
    except InputError as err:
        if on_slide_error != "record" or err.source != str(slide):
            raise
        log.error("%s; recorded as a slide without patches (on_slide_error: record)", err)
        attrs["failed"] = err.reason
        empty = np.zeros((0, 2), np.int64)
        result = _write_store(out, slide, empty, attrs, enc, meta, stain, torch_device, batch_size=batch_size,
                              workers=0, max_bad_patch_fraction=max_bad_patch_fraction, progress=False)
        return replace(result, n_tiles=len(coords), failed=err.reason)


def _write_store(out: Path, slide: Path, coords: np.ndarray, attrs: dict[str, Any], enc: Encoder,
                 meta: dict[str, Any], stain: StainNormaliser | None, torch_device: torch.device, *,
                 batch_size: int, workers: int, max_bad_patch_fraction: float,
                 progress: bool) -> ExtractResult:
    """Embed the patches at ``coords`` and write the complete store ``out`` (atomically) with ``attrs``."""
    dtype = attrs["dtype"]
    started = time.perf_counter()
    with atomic_output(out) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        rows = max(1, min(len(coords), CHUNK_ROWS))
        # every chunk on disk, all-zero ones too: training reads a missing chunk as damage, not zeros
        features = group.create_array("features", shape=(len(coords), enc.feature_dim),
                                      chunks=(rows, enc.feature_dim), dtype=np.dtype(dtype),
                                      config={"write_empty_chunks": True})
        loop = _LoopResult(np.zeros(len(coords), dtype=bool), [], 0, 0.0)
        if len(coords):
            dataset = PatchDataset(slide, coords, int(meta["level"]), attrs["read_size"], enc.input_size,
                                   enc.interpolation, stain)
            writer = _RowWriter(features, rows)
            pad_to = batch_size if torch_device.type == "cuda" else None  # one batch shape on a GPU
            runner = FeatureRunner(enc, torch_device, pad_to=pad_to)
            loop = _embed_patches(dataset, runner, writer, slide=slide, batch_size=batch_size,
                                  workers=workers, max_bad_patch_fraction=max_bad_patch_fraction,
                                  progress=progress)
            n_written = writer.close()
            if n_written != int(loop.kept.sum()):
                raise RuntimeError(f"{slide}: {n_written} feature rows for {int(loop.kept.sum())} patches")
            features.resize((n_written, enc.feature_dim))
        kept_coords = coords[loop.kept]
        group.create_array("coords", data=kept_coords, chunks=(max(1, min(len(kept_coords), CHUNK_ROWS)), 2))
        if loop.bad:
            log.warning("%s: %d of %d patches could not be decoded and are left out (first at x=%d, y=%d)",
                        slide.name, len(loop.bad), len(coords), *coords[loop.bad[0]])
        if loop.stain_unchanged:
            log.warning("%s: stain normalisation left %d patches unchanged (no stain found)",
                        slide.name, loop.stain_unchanged)
        attrs.update({
            "stain_norm_unchanged_patches": loop.stain_unchanged if stain else None,
            "n_patches": len(kept_coords),
            "bad_patches": {"count": len(loop.bad), "locations": coords[loop.bad].tolist()},
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        })
        group.attrs.update(attrs)
        group.attrs["complete"] = True  # the very last write: readers trust nothing without it
    rate = len(coords) / loop.seconds if loop.seconds else float("nan")
    log.info("%s: %d patches -> %s (%d bad) in %.1f s (%.1f patches/s in the loop)",
             slide.name, len(kept_coords), out, len(loop.bad), time.perf_counter() - started, rate)
    return ExtractResult(out, len(kept_coords), len(coords), [tuple(map(int, coords[i])) for i in loop.bad],
                         loop_seconds=loop.seconds)


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
                        help="the encoder frozen by `healnet encoder` (saves 4-8 s per slide job)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
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
                  on_slide_error=args.on_slide_error)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
