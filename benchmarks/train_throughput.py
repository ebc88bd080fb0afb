"""Training throughput: patients/s of one epoch, share of step time spent waiting for data, peak memory.

Two cohorts:

- the demo cohort, when ``omics/DEMO`` and ``features/DEMO/{encoder}`` exist (else skipped, said so);
- a synthetic cohort (default 400 patients x 4096 patches x 1280 float16 features, about 4 GB), written
  once into ``output/benchmark-scratch/train_synthetic/`` as Zarr stores in the layout ``healnet extract``
  writes, plus an omics folder (random omics, survival times).

Two epochs run through the real harness (:func:`healnet.training.loop.train_model`: DataLoader worker(s)
reading bags lazily, at most ``max_patches_train`` patches per bag). "Data wait" is the time the
training loop blocks on ``next(loader)`` divided by the epoch time; the target is below 0.2. The
reader processes persist across epochs, so only the first epoch waits for them to start: on a GPU
that start-up was a third of a 6 s epoch. Both epochs are printed; the second is the steady rate
that the rest of a training run sees. With ``--feature-cache DIR`` (``training.feature_cache``) the
bags are decoded once into a private folder under DIR: the loader alone is then timed twice, filling
the cache and reading from it. ``training.bags_on_device`` (``--bags-on-device``; by default on a
GPU) reads every bag once into the device's memory before the first epoch, which is timed apart,
and the epochs cut their batches there without readers.

    .venv/bin/python benchmarks/train_throughput.py [--model healnet] [--patients 400] [--patches 4096]
        [--dim 1280] [--threads 2] [--workers 1] [--batch-size 8] [--device auto] [--skip-demo]
        [--feature-cache /tmp] [--bags-on-device auto|yes|no]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `healnet train` sets it before torch loads

import argparse
import dataclasses
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import zarr

from healnet.config import BAGS_ON_DEVICE_WORDS, load_config
from healnet.data.bags import BagBatchSampler, BagDataset, make_loader
from healnet.models.baselines import build_model, model_spec
from healnet.settings import Settings, settings_from_config
from healnet.training.cache import decoded_feature_cache
from healnet.training.cohort import prepare_cohort
from healnet.training.fold import fit_omics
from healnet.training.loop import train_model
from healnet.training.memory import resident_bags
from preprocessing.core.devices import resolve_device
from preprocessing.core.workers import resolve_workers, workers_argument

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "output" / "benchmark-scratch" / "train_synthetic"


def write_synthetic(root: Path, patients: int, patches: int, dim: int, seed: int = 0) -> tuple[Path, Path]:
    """Write (once) an omics folder and one feature store per patient; returns (omics_dir, features_dir)."""
    tag = f"{patients}x{patches}x{dim}"
    omics_dir, features_dir = root / tag / "omics", root / tag / "features"
    done = root / tag / "COMPLETE"
    if done.exists():
        return omics_dir, features_dir
    shutil.rmtree(root / tag, ignore_errors=True)
    features_dir.mkdir(parents=True)
    omics_dir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = [f"TCGA-SY-{i:04d}" for i in range(patients)]
    started = time.perf_counter()
    grid = int(np.ceil(np.sqrt(patches)))
    coords = np.stack(np.divmod(np.arange(patches), grid), axis=1).astype(np.int64) * 256
    for i, name in enumerate(names):
        group = zarr.open_group(str(features_dir / f"{name}-01Z-00-DX1.zarr"), mode="w", zarr_format=3)
        feats = group.create_array("features", shape=(patches, dim), chunks=(1024, dim), dtype="float16")
        feats[:] = rng.standard_normal((patches, dim), dtype=np.float32).astype(np.float16)
        group.create_array("coords", data=coords, chunks=(patches, 2))
        group.attrs.update({"encoder": "synthetic", "n_patches": patches, "complete": True})
        if i % 50 == 0:
            print(f"  wrote {i + 1}/{patients} stores ({time.perf_counter() - started:.0f} s)", flush=True)
    time_ = rng.exponential(30, patients)
    pd.DataFrame(
        {
            "patient": names,
            "time": time_,
            "event": (rng.random(patients) < 0.5).astype(int),
            "slides": [[f"{n}-01Z-00-DX1"] for n in names],
            "has_wsi": True,
            "has_omics": True,
        }
    ).to_parquet(omics_dir / "manifest.parquet")
    cols = [f"rna:G{j}" for j in range(200)] + [f"cnv:C{j}" for j in range(50)]
    pd.DataFrame(
        rng.standard_normal((patients, len(cols))).astype(np.float32),
        columns=cols,
        index=pd.Index(names, name="patient"),
    ).to_parquet(omics_dir / "features.parquet")
    pd.DataFrame({"fold": 0, "patient": names, "role": "train"}).to_parquet(omics_dir / "splits.parquet")
    done.write_text(f"{time.perf_counter() - started:.0f} s\n")
    return omics_dir, features_dir


def data_rate(dataset: BagDataset, rows: np.ndarray, batch_size: int, workers: int) -> float:
    """Patients/s the DataLoader alone delivers (no model): the ceiling for a fast GPU."""
    sampler = BagBatchSampler(rows, batch_size, shuffle=True, seed=0, sample=True)
    start, seen = time.perf_counter(), 0
    for batch in make_loader(dataset, sampler, workers):
        seen += len(batch["row"])
    return seen / (time.perf_counter() - start)


def two_epochs(
    omics_dir: Path,
    features_dir: Path,
    settings: Settings,
    model_name: str,
    device: torch.device,
    workers: int,
    cache_root: Path | None = None,
) -> dict[str, Any]:
    """Fit omics and time bins on all patients, then time two training epochs of ``model_name``
    (with a decoded-feature cache under ``cache_root`` when given)."""
    from preprocessing.omics.labels import TimeBins

    with decoded_feature_cache(cache_root) as cache_dir:  # removed when the timing is done
        cohort = prepare_cohort(model_name, omics_dir, features_dir)
        manifest, training = cohort.tables.manifest, settings.training
        times, events = manifest["time"].to_numpy(float), manifest["event"].to_numpy(int)
        bins = TimeBins(settings.n_bins).fit(times, events).transform(times)
        state = fit_omics(cohort.tables.features, cohort.patients, training, manifest[["time", "event"]])
        omics, has_omics = state.matrix(cohort.tables.features, cohort.patients)
        dataset = BagDataset(
            omics,
            has_omics,
            cohort.bags,
            bins,
            events,
            times,
            max_patches=training.max_patches_train,
            read_wsi=cohort.wsi_dim is not None,
            cache_dir=cache_dir,
        )
        spec = model_spec(
            model_name,
            n_bins=settings.n_bins,
            wsi_dim=cohort.wsi_dim,
            n_omics=omics.shape[1],
            omic_groups=state.groups,
            healnet=settings.healnet,
            training=training,
        )
        torch.manual_seed(0)
        model = build_model(spec).to(device)
        rows = np.flatnonzero(dataset.has_wsi | has_omics)
        loader_rate = data_rate(dataset, rows[:160], training.batch_size, workers)
        cached_rate = data_rate(dataset, rows[:160], training.batch_size, workers) if cache_dir else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        resident = resident_bags(dataset, rows, device, workers, settings.run.bags_on_device)
        history = train_model(model, dataset, rows, None, dataclasses.replace(training, epochs=2), device, 0,
                              workers, None, resident=resident)
        record = {**history[1], "first": history[0], "workers": workers}
        if resident is not None:
            record["bags_on_device_seconds"] = resident.load_seconds
        n_patches = np.array([sum(s.n for s in bag) for bag in cohort.bags if bag])
        record.update(
            loader_patients_per_s=loader_rate,
            cached_loader_patients_per_s=cached_rate,
            patients=len(rows),
            median_patches=float(np.median(n_patches)) if len(n_patches) else 0,
            feature_dim=cohort.wsi_dim,
        )
        if device.type == "cuda":
            record["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return record


def report(name: str, record: dict[str, Any]) -> None:
    """Print one result line set."""
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(
        f"[{name}] {record['patients']} patients, median {record['median_patches']:.0f} patches x "
        f"{record['feature_dim']} features per bag"
    )
    first = record["first"]
    if "bags_on_device_seconds" in record:
        print(f"[{name}] bags read once into the device's memory before the first epoch: "
              f"{record['bags_on_device_seconds']:.1f} s")
    print(
        f"[{name}] first epoch (readers start, unless the bags are on the device): {first['seconds']:.1f} s, "
        f"{first['patients_per_s']:.2f} patients/s, data wait fraction {first['data_wait_fraction']:.3f}"
    )
    print(
        f"[{name}] second epoch: {record['seconds']:.1f} s, {record['patients_per_s']:.2f} patients/s, "
        f"data wait fraction {record['data_wait_fraction']:.3f} (target < 0.2)"
    )
    print(f"[{name}] training loss, epochs 1 and 2: {first['train_loss']:.6f} {record['train_loss']:.6f}")
    print(
        f"[{name}] DataLoader alone (no model, first 160 bags): "
        f"{record['loader_patients_per_s']:.1f} patients/s"
        + ("" if record["cached_loader_patients_per_s"] is None else
           f" (filling the decoded cache); {record['cached_loader_patients_per_s']:.1f} patients/s from it")
    )
    # RUSAGE_CHILDREN also counts processes started while torch was imported (about 0.4 GiB here),
    # so it bounds the readers from above, and says nothing when there are none
    line = f"[{name}] peak RSS: main process {self_rss:.2f} GiB"
    if record.get("workers"):
        line += f", largest child process (readers, or a helper torch started) {child_rss:.2f} GiB"
    if "cuda_max_allocated_gb" in record:
        line += f", CUDA max allocated {record['cuda_max_allocated_gb']:.2f} GiB"
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "config.yaml")
    parser.add_argument("--model", default="healnet")
    parser.add_argument("--patients", type=int, default=400)
    parser.add_argument("--patches", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=workers_argument, default=None,
                        help="a number or auto (default: training.workers of the config)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: training.batch_size")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--bags-on-device", choices=list(BAGS_ON_DEVICE_WORDS), default=None,
                        help="as training.bags_on_device (default: the config's)")
    parser.add_argument("--feature-cache", type=Path, default=None, metavar="DIR",
                        help="decoded-feature cache under DIR, as training.feature_cache (default: none)")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    settings = settings_from_config(config)
    if args.batch_size:
        settings = dataclasses.replace(
            settings, training=dataclasses.replace(settings.training, batch_size=args.batch_size))
    if args.bags_on_device is not None:
        run = dataclasses.replace(settings.run, bags_on_device=BAGS_ON_DEVICE_WORDS[args.bags_on_device])
        settings = dataclasses.replace(settings, run=run)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    setting = settings.run.workers if args.workers is None else args.workers
    workers = resolve_workers(setting, device.type, args.threads)
    print(
        f"model {args.model}, device {device}, {args.threads} torch thread(s), {workers} loader worker(s), "
        f"batch {settings.training.batch_size}, max {settings.training.max_patches_train} "
        f"patches/bag, bags_on_device {settings.run.bags_on_device}"
    )
    if not args.skip_demo:
        omics_dir = ROOT / "output" / "omics" / "DEMO"
        features_dir = ROOT / "output" / "features" / "DEMO" / config["extract"]["encoder"]
        if (omics_dir / "manifest.parquet").is_file() and features_dir.is_dir():
            report("demo", two_epochs(omics_dir, features_dir, settings, args.model, device, workers,
                                      args.feature_cache))
        else:
            print(f"[demo] skipped: {omics_dir} or {features_dir} does not exist (run the pipeline first)")
    if not args.skip_synthetic:
        print(
            f"[synthetic] {args.patients} patients x {args.patches} patches x {args.dim} features "
            f"({args.patients * args.patches * args.dim * 2 / 1e9:.1f} GB float16) in {OUT}"
        )
        omics_dir, features_dir = write_synthetic(OUT, args.patients, args.patches, args.dim)
        report("synthetic", two_epochs(omics_dir, features_dir, settings, args.model, device, workers,
                                       args.feature_cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
