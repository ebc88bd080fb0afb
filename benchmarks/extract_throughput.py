"""Extraction throughput: is `healnet extract` as fast as its slower half allows?

For each slide, measured in the same run with the same settings:
  (a) read-only patches/s: the DataLoader alone (read, decode, resize, normalise; no model),
  (b) model-only patches/s: the encoder on random uint8 batches (normalisation included),
  (c) end-to-end patches/s: :func:`preprocessing.features.extract.extract_slide`'s patch loop,
and c / best, where best = 1 / (1/a + 1/b) on CPU (reading and model share the cores) and
min(a, b) on GPU. Target: c / best >= 0.85. Each repeat measures c first, so the first c of the
first slide is a cold start, as in every `healnet extract` job; its ratio is printed too. On CPU with
reader processes, reading and the model overlap in part, so c can exceed that best (c / best above
1); c / min(a, b), the ceiling if they overlapped fully, is printed beside it.

Slides: two demo slides from output/data/DEMO/slides when present, else one synthetic demo-like slide
(written once to output/benchmark-scratch/), and the real ../shared/data/slides/CMU-1-Small-Region.svs when
present. Tiles come from preprocessing.tiling.tile when importable, else from a plain grid.

    .venv/bin/python benchmarks/extract_throughput.py [--max-patches 384] [--workers 1] [--threads 2]
        [--reader auto|tiles|gpu|openslide]
    .venv/bin/python benchmarks/extract_throughput.py --encoder resnet50_trunc --device cuda \
        --dtype float16 --workers 12 --batch-size 256 --allow-random-weights
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `healnet extract` sets it before torch loads

import argparse
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import torch

from preprocessing.core.devices import resolve_device
from preprocessing.features.encoders import Encoder, build_encoder
from preprocessing.features.extract import extract_slide
from preprocessing.features.patch_transforms import Normalise
from preprocessing.features.patches import READERS, PatchDataset, make_loader, single_threaded_opencv
from preprocessing.features.registry import patch_geometry
from preprocessing.features.runner import FeatureRunner, usable_cores
from preprocessing.tiling.tiles import read_tiles, write_tiles

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "output" / "benchmark-scratch"
DEMO = ROOT / "output" / "data" / "DEMO" / "slides"
REAL = ROOT / ".." / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
SYNTHETIC = OUT / "extract_synthetic.svs"


def synthetic_slide(path: Path = SYNTHETIC, side: int = 20000) -> Path:
    """A demo-like 40x slide (the demo renderer when importable, else a stain-like texture)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from preprocessing.demo.render import SlideSpec, write_slide

        spec = SlideSpec(file_name=path.name, patient="TCGA-XX-0000", dx=1, magnification=40, mpp=0.25,
                         width=side, height=side * 3 // 4, seed=3, tumour_fraction=0.5, pen=None,
                         pale=False, corrupt=None)
        return write_slide(spec, path)
    except (ImportError, TypeError):
        from preprocessing.demo.svs_writer import write_aperio_svs  # needs imagecodecs (JPEG tiles)

        rng = np.random.default_rng(0)
        texture = np.clip(rng.normal(0, 1, (1024, 1024, 3)).cumsum(0).cumsum(1) / 40, -60, 60)
        texture = (np.array([200, 130, 190]) + texture).clip(0, 255).astype(np.uint8)

        def render(ds: float, x: int, y: int, w: int, h: int) -> np.ndarray:
            ys, xs = (np.arange(h) + y) % 1024, (np.arange(w) + x) % 1024
            return texture[np.ix_(ys, xs)]

        return write_aperio_svs(path, side, side * 3 // 4, render, mpp=0.25, app_mag=40)


def make_tiles(slide: Path, dest: Path, max_patches: int, repeats: int = 1,
               geometry: tuple[int, float] = (256, 0.5)) -> Path:
    """Tiles of ``slide`` (at most ``max_patches``, evenly spread, then listed ``repeats`` times) -> ``dest``,
    cut at ``geometry`` (patch px, µm per px; the encoder's, as the workflow tiles for it).

    Repeating the list lets a small slide keep a GPU busy long enough to time; every listed patch is
    still read and decoded (OpenSlide's small tile cache cannot hold a whole pass over the slide).
    """
    try:
        from preprocessing.tiling.tile import tile_slide

        result = tile_slide(slide, patch_size=geometry[0], target_mpp=geometry[1], qc=False)
        frame, meta = result.tiles, result.meta
    except ImportError:
        with openslide.OpenSlide(str(slide)) as handle:
            mpp = float(handle.properties[openslide.PROPERTY_NAME_MPP_X])
            size0 = round(geometry[0] * geometry[1] / mpp)
            level = handle.get_best_level_for_downsample(size0 / geometry[0])
            downsample = float(handle.level_downsamples[level])
            width, height = handle.dimensions
        xs, ys = np.meshgrid(np.arange(0, width - size0 + 1, size0), np.arange(0, height - size0 + 1, size0))
        frame = pd.DataFrame({"x": xs.ravel(), "y": ys.ravel(), "tissue_fraction": 1.0})
        meta = {"slide": slide.stem, "level": int(level), "downsample": downsample,
                "patch_size_level0": size0, "patch_size": geometry[0], "target_mpp": geometry[1], "mpp": mpp,
                "mpp_source": "openslide"}
    if len(frame) > max_patches:
        keep = np.linspace(0, len(frame) - 1, max_patches).round().astype(int)
        frame = frame.iloc[keep].reset_index(drop=True)
    if repeats > 1:
        frame = pd.concat([frame] * repeats, ignore_index=True)
    return write_tiles(dest, frame, meta)


def read_only_rate(dataset: PatchDataset, encoder: Encoder, device: torch.device, batch_size: int,
                   workers: int) -> float:
    """Patches/s of the loader alone, batches normalised on ``device`` as the real loop does."""
    normalise = Normalise(encoder.mean, encoder.std).to(device)
    loader = make_loader(dataset, batch_size, workers, pin_memory=device.type == "cuda")
    start = time.perf_counter()
    with single_threaded_opencv():
        for images, _, _ in loader:
            normalise(images.to(device, non_blocking=True))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(dataset) / (time.perf_counter() - start)


def model_only_rate(runner: FeatureRunner, encoder: Encoder, batch_size: int, n_patches: int) -> float:
    """Patches/s of the encoder on random uint8 batches (one warm-up batch not counted)."""
    height, width = encoder.input_size
    batch = torch.randint(0, 256, (batch_size, height, width, 3), dtype=torch.uint8)
    if runner.device.type == "cuda":
        batch = batch.pin_memory()
    runner(batch).cpu()
    n_batches = max(2, math.ceil(n_patches / batch_size))
    start = time.perf_counter()
    for _ in range(n_batches):
        out = runner(batch)
    out.cpu()
    return n_batches * batch_size / (time.perf_counter() - start)


def measure(slide: Path, encoder: Encoder, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    """a, b, c and the ratio for one slide."""
    tiles = make_tiles(slide, workdir / f"{slide.stem}.parquet", args.max_patches, args.tile_repeats,
                       patch_geometry(encoder.name))
    frame, meta = read_tiles(tiles)
    coords = frame[["x", "y"]].to_numpy(np.int64)
    device = resolve_device(args.device)
    n_threads = args.threads
    read_size = round(meta["patch_size_level0"] / meta["downsample"])
    dataset = PatchDataset(slide, coords, meta["level"], read_size, encoder.input_size, encoder.interpolation,
                           reader=args.reader, device=device)
    runner = FeatureRunner(encoder, device)
    rates: dict[str, list[float]] = {"a": [], "b": [], "b_one_thread": [], "c": []}
    for _ in range(args.repeats):
        # c first: the first slide's first run finds the model cold, as each `healnet extract` job does
        out = workdir / f"{slide.stem}.zarr"
        result = extract_slide(slide, tiles, out, encoder=encoder, batch_size=args.batch_size,
                               device=args.device, dtype=args.dtype, workers=args.workers,
                               threads=args.threads, progress=False, reader=args.reader)
        rates["c"].append(len(coords) / result.loop_seconds)
        shutil.rmtree(out, ignore_errors=True)
        torch.set_num_threads(n_threads)
        rates["a"].append(read_only_rate(dataset, encoder, device, args.batch_size, args.workers))
        rates["b"].append(model_only_rate(runner, encoder, args.batch_size, len(coords)))
        if device.type == "cpu" and n_threads > 1:
            torch.set_num_threads(1)
            rates["b_one_thread"].append(model_only_rate(runner, encoder, args.batch_size, len(coords)))
    a, c = max(rates["a"]), max(rates["c"])
    # the model's best speed alone: with the job's threads, or with one (when that is faster here)
    b = max(rates["b"] + rates["b_one_thread"])
    best = min(a, b) if device.type == "cuda" else 1 / (1 / a + 1 / b)
    return {"slide": slide.name, "patches": len(coords), "a_read": a, "b_model": b, "c_end_to_end": c,
            "c_first_run": rates["c"][0], "best": best, "ratio": c / best,
            "ratio_first_run": rates["c"][0] / best, "ratio_to_slower_half": c / min(a, b),
            "model_threads": n_threads,
            "runs": {k: [round(x, 1) for x in v] for k, v in rates.items() if v}}


def main() -> None:
    """Pick slides, measure each, print one line per slide and a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="efficientnet_lite0")
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="benchmark an encoder whose weights cannot be fetched here")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=usable_cores(),
                        help="torch threads for the model (as `healnet extract --threads`)")
    parser.add_argument("--reader", default="auto", choices=list(READERS),
                        help="how patches are read (as `healnet extract --reader`; auto: gpu on CUDA)")
    parser.add_argument("--max-patches", type=int, default=384, help="patches per slide (evenly spread)")
    parser.add_argument("--tile-repeats", type=int, default=1,
                        help="list each slide's tiles this many times (keeps a GPU busy on a small slide)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of a, b, c each; the best is kept")
    parser.add_argument("--slides", type=Path, nargs="*", help="slides to use instead of the defaults")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    slides = args.slides or (sorted(DEMO.glob("*.svs"))[:2] if DEMO.is_dir() else [synthetic_slide()])
    if not args.slides and REAL.exists():
        slides.append(REAL.resolve())
    encoder = build_encoder(args.encoder, args.weights, args.allow_random_weights)
    print(f"encoder {encoder.name} ({encoder.weights_source}), device {resolve_device(args.device)}, "
          f"reader {args.reader}, "
          f"batch {args.batch_size}, workers {args.workers}, threads {args.threads}, cores "
          f"{usable_cores()}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for slide in slides:
            row = measure(slide, encoder, args, Path(tmp))
            results.append(row)
            print(f"{row['slide']}: {row['patches']} patches  a(read) {row['a_read']:.1f}/s  "
                  f"b(model) {row['b_model']:.1f}/s  c(end-to-end) {row['c_end_to_end']:.1f}/s  "
                  f"best {row['best']:.1f}/s  c/best {row['ratio']:.2f} "
                  f"(first run {row['ratio_first_run']:.2f}; c/min(a,b) {row['ratio_to_slower_half']:.2f})  "
                  f"(model threads {row['model_threads']}; runs {row['runs']})", flush=True)
    print(json.dumps(results, default=float))


if __name__ == "__main__":
    main()
