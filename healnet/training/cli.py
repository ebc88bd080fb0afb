"""Cross-validated training of one model on one cohort: ``healnet train``.

Per fold (patient-level, from ``splits.parquet``; role ``val`` is the held-out fold):

1. fit the omic transform (log, MAD feature selection, imputation, scaling) and the survival time bins
   on the fold's training patients only;
2. train with AdamW on the discrete-time NLL (+ L1 on the omic input projection), fixed epochs or early
   stopping on an inner validation split carved from the training fold (stratified by event, seeded);
   the held-out fold is never looked at while training;
3. score the held-out patients with every patch of their slides, in the settings ``full`` and, for
   multimodal models, ``omics_only`` / ``wsi_only`` / ``random_half`` (each patient with both
   modalities loses one at random, seeded);
4. write ``fold{k}.pt`` (weights, model spec, transform and bin states, feature names, WSI feature dim,
   training-median risk).

While a fold trains, its state (weights, optimiser, random generators, history) is saved at the end
of an epoch at most every ``training.save_state_minutes`` to ``MODELS_DIR/unfinished-fold{k}.pt``, and
deleted once ``fold{k}.pt`` is written. A job killed by a cluster's time limit or a pre-emption
therefore resumes at the saved epoch when it is rerun, with the numbers an uninterrupted run gives,
provided the settings and data are those that made the file (it is ignored otherwise).

Patients a model cannot score (a unimodal model's patients without its modality, or anyone left
without any modality in a missing-modality setting) are excluded from that model's training and
scored with the training-median risk (training-mean survival curve for the Brier score), so every
model is evaluated on the same patients; ``folds.csv`` counts them in ``n_imputed``.

Outputs: ``MODELS_DIR/fold{k}.pt``; ``RESULTS_DIR/folds.csv`` (model, fold, setting, metric, value,
n_patients, n_events, n_imputed, note), ``predictions.parquet`` (patient, fold, setting, risk, time,
event, train_median_risk, imputed), ``log.json`` (per-epoch losses and timings, notes).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from healnet.config import BAGS_ON_DEVICE_WORDS
from healnet.data.results import c_index_summary
from healnet.modalities import MODEL_MODALITIES
from healnet.settings import RunSettings, Settings, load_settings
from healnet.training.collect import parse_folds
from healnet.training.cv import run_cv
from preprocessing.core.devices import resolve_device
from preprocessing.core.errors import InputError
from preprocessing.core.workers import workers_argument


def run_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The options ``healnet train`` and ``healnet search`` share: the run's config, cohort, model,
    inputs and run settings."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help="config.yaml (or the JSON snapshot Snakemake writes)")
    parser.add_argument("--cohort", required=True)
    parser.add_argument("--model", required=True, choices=sorted(MODEL_MODALITIES))
    parser.add_argument("--omics-dir", required=True, type=Path)
    parser.add_argument(
        "--features-dir",
        type=Path,
        default=None,
        help="folder of {slide}.zarr stores (absent or empty: no WSI)",
    )
    parser.add_argument("--models-dir", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--workers", type=workers_argument, default=None,
                        help="processes reading WSI bags, or auto (default: training.workers of the config)")
    parser.add_argument("--save-state-minutes", type=int, default=None,
                        help="save an unfinished fold's state at most this often, 0: every epoch "
                        "(default: training.save_state_minutes of the config)")
    parser.add_argument("--feature-cache", default=None, metavar="DIR",
                        help="decode each feature store once into a private folder under DIR, removed at the "
                        "end; 'none' for none (default: training.feature_cache of the config)")
    parser.add_argument("--bags-on-device", choices=list(BAGS_ON_DEVICE_WORDS), default=None,
                        help="keep the training bags in the device's memory after one read (auto: on a GPU, "
                        "when they fit; default: training.bags_on_device of the config)")
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default=None,
        help="default: training.device of the config",
    )
    return parser


def _parser() -> argparse.ArgumentParser:
    parser = run_parser("healnet train", __doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", required=True, type=Path)
    parser.add_argument("--folds", default=None, help="comma-separated fold numbers (default: all)")
    parser.add_argument("--search-dir", type=Path, default=None,
                        help="where `healnet search` wrote the inner scores of training.search "
                        "(fold{k}/setting{i}.json); default: the search runs in this job")
    return parser


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The run settings the command line sets (those it leaves out keep the config's)."""
    if args.save_state_minutes is not None and args.save_state_minutes < 0:
        raise InputError("--save-state-minutes", f"must be 0 or more, got {args.save_state_minutes}")
    given = {
        "workers": args.workers,
        "threads": args.threads,  # recorded in log.json as run
        "save_state_minutes": args.save_state_minutes,
        "feature_cache": args.feature_cache,
        "bags_on_device": None if args.bags_on_device is None else BAGS_ON_DEVICE_WORDS[args.bags_on_device],
        "device": args.device,
    }
    return {key: value for key, value in given.items() if value is not None}


def run_settings(args: argparse.Namespace) -> tuple[Settings, torch.device]:
    """The config's settings with the command line's run settings, and the device to run on."""
    settings = load_settings(args.config)
    device = resolve_device(args.device or settings.run.device)
    run: RunSettings = dataclasses.replace(settings.run, **run_overrides(args))
    return dataclasses.replace(settings, run=run), device


def cli(argv: list[str] | None = None) -> int:
    """``healnet train``: cross-validated training of one model on one cohort."""
    args = _parser().parse_args(argv)
    settings, device = run_settings(args)
    table = run_cv(
        settings,
        args.cohort,
        args.model,
        args.omics_dir,
        args.features_dir,
        args.models_dir,
        args.results_dir,
        device,
        parse_folds(args.folds),
        args.threads,
        args.search_dir,
    )
    print(f"{args.cohort} {args.model}: {c_index_summary(table)}")
    return 0
