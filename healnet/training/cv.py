"""Cross-validated training of one model on one cohort: every requested fold, then the results files.

Per fold (patient-level, from ``splits.parquet``; role ``val`` is the held-out fold) the omic
transform and the time bins are fitted on the training patients, the model is trained and the
held-out patients are scored (:mod:`healnet.training.fold`); a killed job resumes at a fold's saved
epoch (:mod:`healnet.training.resume`).

Outputs: ``MODELS_DIR/fold{k}.pt`` (:mod:`healnet.data.checkpoints`); ``RESULTS_DIR/folds.csv``,
``predictions.parquet`` and ``log.json`` (:mod:`healnet.data.results`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from healnet.data.results import FOLD_COLUMNS, write_results
from healnet.modalities import LINEAR_MODELS, MODEL_MODALITIES
from healnet.settings import Settings
from healnet.training.cache import decoded_feature_cache
from healnet.training.cohort import Cohort, prepare_cohort
from healnet.training.fold import FoldResult, run_fold
from healnet.training.search import choose, read_scores, select_settings
from preprocessing.core.errors import InputError
from preprocessing.core.workers import resolve_workers


def run_cv(
    settings: Settings,
    cohort_name: str,
    model_name: str,
    omics_dir: Path,
    features_dir: Path | None,
    models_dir: Path,
    results_dir: Path,
    device: torch.device,
    folds: Sequence[int] | None = None,
    threads: int | None = None,
    search_dir: Path | None = None,
) -> pd.DataFrame:
    """Train and score every requested fold; write the outputs; return the ``folds.csv`` table.

    ``threads``: torch CPU threads for this run (None: torch's own choice). ``search_dir``: where
    ``healnet search`` wrote the candidates' inner scores (None: the search runs here).
    """
    settings, cohort = prepare_run(settings, model_name, omics_dir, features_dir, device, threads)
    folds = checked_folds(cohort, folds)
    models_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with decoded_feature_cache(feature_cache_root(settings, cohort)) as cache_dir:
        results = [searched_fold(cohort, model_name, f, settings, device, models_dir, cache_dir, search_dir)
                   for f in folds]
    table = pd.DataFrame([m for r in results for m in r.metrics], columns=list(FOLD_COLUMNS))
    predictions = pd.concat([p for r in results for p in r.predictions], ignore_index=True)
    record = run_log(settings, cohort_name, model_name, device, cohort)
    record["seconds"] = round(time.perf_counter() - started, 2)
    record["folds"] = [r.log for r in results]
    write_results(results_dir, table, predictions, record)
    return table


def prepare_run(settings: Settings, model_name: str, omics_dir: Path, features_dir: Path | None,
                device: torch.device, threads: int | None) -> tuple[Settings, Cohort]:
    """Check the model, set the torch threads, resolve the run settings (reader processes, feature
    cache: log.json records those that ran, no cache as null) and read the cohort."""
    if model_name not in MODEL_MODALITIES:
        raise InputError("--model", f"unknown model {model_name!r}; choose from {sorted(MODEL_MODALITIES)}")
    if threads:
        torch.set_num_threads(threads)
    workers = resolve_workers(settings.run.workers, device.type, torch.get_num_threads())
    cache = settings.run.feature_cache
    cache = None if cache in ("", "none") else cache  # "none": how the workflow and the CLI say no cache
    settings = dataclasses.replace(settings, run=dataclasses.replace(settings.run, workers=workers,
                                                                       feature_cache=cache))
    return settings, prepare_cohort(model_name, omics_dir, features_dir)


def checked_folds(cohort: Cohort, folds: Sequence[int] | None, option: str = "--folds") -> list[int]:
    """The requested folds (None: all of ``splits.parquet``); InputError, naming the command line's
    ``option``, for one it does not have."""
    available = sorted(int(f) for f in cohort.tables.splits["fold"].unique())
    folds = available if folds is None else list(folds)
    bad = [f for f in folds if f not in available]
    if bad:
        raise InputError(option, f"fold(s) {bad} not in splits.parquet (has {available})")
    return folds


def feature_cache_root(settings: Settings, cohort: Cohort) -> str | None:
    """Where the run decodes feature stores (None: no cache, or a cohort without slides)."""
    return settings.run.feature_cache if cohort.wsi_dim is not None else None


def searched_fold(cohort: Cohort, model_name: str, fold: int, settings: Settings, device: torch.device,
                  models_dir: Path, cache_dir: Path | None, search_dir: Path | None = None) -> FoldResult:
    """One fold, with the settings ``training.search`` chooses on its training patients when set
    (closed-form models have nothing to search), scored here or read from ``search_dir``; the choice
    goes into the fold's log."""
    search, workers = None, settings.run.workers
    if settings.training.search and model_name not in LINEAR_MODELS:
        if search_dir is None:
            settings, search = select_settings(cohort, model_name, fold, settings, device, models_dir,
                                               workers, cache_dir)
        else:
            settings, search = choose(settings, fold, read_scores(search_dir / f"fold{fold}", fold, settings))
    result = run_fold(cohort, model_name, fold, settings, device, models_dir, workers, cache_dir)
    if search is not None:
        result.log["search"] = search
    return result


def run_log(settings: Settings, cohort_name: str, model_name: str, device: torch.device,
            cohort: Cohort) -> dict[str, Any]:
    """The run's description in ``log.json`` (the seconds and per-fold logs go after it)."""
    return {
        "cohort": cohort_name,
        "model": model_name,
        "device": str(device),
        "notes": cohort.notes,
        "training": dataclasses.asdict(settings.training),
        "run": dataclasses.asdict(settings.run),
        "healnet": dataclasses.asdict(settings.healnet),
        "n_bins": settings.n_bins,
    }
