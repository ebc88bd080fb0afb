"""Patch reading speed: OpenSlide's read_region against the JPEG tile reader, on one slide's grid.

The slide is tiled with `healnet tile`'s own code (0.5 um/px, 256 px patches, its tissue mask) and
the patches are read, in tile order, in this one process (no reader processes), through
:class:`preprocessing.features.patches.PatchDataset` as extraction reads them: once with
``--reader openslide`` and once with the reader under test (``--reader``, default ``tiles``), each
after a warm-up on separate handles. ``--reader gpu`` reads batches of ``--batch-size`` through
:func:`preprocessing.features.patches.make_loader`, decoding on ``--decode-device`` (``cuda`` where
available, else ``cpu``); its timing ends when the last batch is on that device, and the patches are
copied back to the host only afterwards, for the comparison. Printed: patches/s of each,
``ratio_vs_openslide``, the mean absolute pixel difference of the patches (``mean_abs_diff``,
0-255), and with ``--features`` (the default) the default encoder's features on a sample of patches
from both readers, compared by cosine similarity (``min_cosine``). One run; the machine's other
load makes timings noisy.

    .venv/bin/python benchmarks/read_throughput.py SLIDE [--reader tiles|auto|gpu] [--patches N]
        [--decode-device cpu|cuda] [--batch-size 64] [--sample 64] [--no-features]

SLIDE ``demo40`` writes (once) a 40x (0.25 um/px) demo slide, 32,000 x 24,000 px, with the demo
cohort's renderer to output/benchmark-scratch/read_demo40.svs and reads that.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `healnet extract` sets it before torch loads

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import openslide
import torch

from preprocessing.features.encoders import DEFAULT_ENCODER, build_encoder
from preprocessing.features.patches import BAD, FELL_BACK, PatchDataset, make_loader, single_threaded_opencv
from preprocessing.features.runner import FeatureRunner
from preprocessing.tiling.tile import tile_slide

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "output" / "benchmark-scratch"
DEMO40 = OUT / "read_demo40.svs"


def demo40(path: Path = DEMO40) -> Path:
    """A 40x demo slide written with the demo cohort's renderer (once; reused when present)."""
    if path.exists():
        return path
    from preprocessing.demo.render import SlideSpec, write_slide

    path.parent.mkdir(parents=True, exist_ok=True)
    spec = SlideSpec(file_name=path.name, patient="TCGA-XX-0000", dx=1, magnification=40, mpp=0.25,
                     width=32000, height=24000, seed=5, tumour_fraction=0.5, pen=None, pale=False,
                     corrupt=None)
    return write_slide(spec, path)


def read_all(dataset: PatchDataset) -> tuple[list[np.ndarray], list[int], float]:
    """Every patch of ``dataset`` in order: (patches, statuses, seconds)."""
    patches, statuses = [], []
    start = time.perf_counter()
    with single_threaded_opencv():  # as extraction's reader processes run
        for index in range(len(dataset)):
            rgb, status = dataset.read(index)
            patches.append(rgb)
            statuses.append(status)
    return patches, statuses, time.perf_counter() - start


def read_batches(dataset: PatchDataset, batch_size: int) -> tuple[list[np.ndarray], list[int], float]:
    """Every patch of a gpu-reader ``dataset`` through its loader: (patches, statuses, seconds); the
    clock stops once the last batch is on the decode device, before the copies to the host."""
    batches, statuses = [], []
    start = time.perf_counter()
    for images, _, status in make_loader(dataset, batch_size, 0, pin_memory=False):
        batches.append(images)
        statuses += status.tolist()
    if dataset.device.type == "cuda":
        torch.cuda.synchronize(dataset.device)
    seconds = time.perf_counter() - start
    return [rgb for images in batches for rgb in images.cpu().numpy()], statuses, seconds


def cosines(first: list[np.ndarray], second: list[np.ndarray], sample: np.ndarray) -> np.ndarray:
    """Cosine similarity of the default encoder's features of the sampled patches of both readers."""
    runner = FeatureRunner(build_encoder(DEFAULT_ENCODER), torch.device("cpu"))
    a = runner(torch.from_numpy(np.stack([first[i] for i in sample])))
    b = runner(torch.from_numpy(np.stack([second[i] for i in sample])))
    return torch.nn.functional.cosine_similarity(a, b, dim=1).numpy()


def main() -> None:
    """Tile the slide, time both readers, compare their patches; print one line per figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slide", help="slide file, or demo40 for a written 40x demo slide")
    parser.add_argument("--reader", default="tiles", choices=["tiles", "auto", "gpu"],
                        help="the reader compared with OpenSlide")
    parser.add_argument("--decode-device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where --reader gpu decodes (and --reader auto picks gpu when cuda)")
    parser.add_argument("--batch-size", type=int, default=64, help="patches per batch (--reader gpu)")
    parser.add_argument("--patches", type=int, default=None, help="the first N patches in tile order")
    parser.add_argument("--sample", type=int, default=64, help="patches compared by their features")
    parser.add_argument("--no-features", dest="features", action="store_false")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    slide = demo40() if args.slide == "demo40" else Path(args.slide)
    with openslide.OpenSlide(str(slide)) as handle:
        vendor = handle.properties.get(openslide.PROPERTY_NAME_VENDOR)
        size = handle.dimensions
    tiled = tile_slide(slide, target_mpp=0.5, patch_size=256, qc=False)
    meta = tiled.meta
    coords = tiled.tiles[["x", "y"]].to_numpy(np.int64)[:args.patches]
    read_size = max(1, round(meta["patch_size_level0"] / meta["downsample"]))
    print(f"slide: {slide.name} ({vendor}, {size[0]} x {size[1]} px, {meta['mpp']:.4g} um/px); level "
          f"{meta['level']}, read {read_size} px -> 224; {len(coords)} patches")

    def dataset(reader: str, n: int | None = None) -> PatchDataset:
        return PatchDataset(slide, coords[:n], meta["level"], read_size, (224, 224), "bicubic",
                            reader=reader, device=args.decode_device if reader != "openslide" else None)

    def read(fresh: PatchDataset) -> tuple[list[np.ndarray], list[int], float]:
        return read_batches(fresh, args.batch_size) if fresh.reader == "gpu" else read_all(fresh)

    results, seconds_of = {}, {}
    for reader in ("openslide", args.reader):
        read(dataset(reader, 8))  # warm-up on other handles: library set-up, file cache
        fresh = dataset(reader)
        patches, statuses, seconds = read(fresh)
        results[reader], seconds_of[reader] = patches, seconds
        flags = np.array(statuses)
        print(f"{reader}: {len(coords) / seconds:.1f} patches/s ({len(coords)} in {seconds:.2f} s; "
              f"bad {int((flags == BAD).sum())}, fell back {int(((flags & FELL_BACK) != 0).sum())}); "
              f"reader {fresh.describe_reader()}")
    print(f"ratio_vs_openslide: {seconds_of['openslide'] / seconds_of[args.reader]:.2f}")
    diff = np.array([np.abs(a.astype(np.int16) - b).mean()
                     for a, b in zip(results["openslide"], results[args.reader], strict=True)])
    print(f"mean_abs_diff: {diff.mean():.3f} (largest of one patch: {diff.max():.3f})")
    if args.features:
        sample = np.unique(np.linspace(0, len(coords) - 1, min(args.sample, len(coords))).round().astype(int))
        cos = cosines(results["openslide"], results[args.reader], sample)
        print(f"min_cosine: {cos.min():.5f} (mean {cos.mean():.5f} over {len(sample)} sampled patches)")


if __name__ == "__main__":
    main()
