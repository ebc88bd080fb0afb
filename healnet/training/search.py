"""Nested cross-validated choice of settings (``training.search``) inside one outer fold.

``training.search`` maps setting names (of the ``training:`` or ``healnet:`` sections) to the values
to try; every combination is a candidate. The outer fold's training patients are split into
``training.search_folds`` inner folds (stratified by event, seeded by the fold's seed); each candidate
is trained on all inner folds but one and scored by Harrell's c-index on that one, exactly as an
outer fold is (its own omic transform, time bins and inner early stopping). The candidate with the
best mean inner c-index (the first listed on a tie) is then trained on the whole training fold by
the caller. The outer fold's held-out patients are never read: the splits, fits and scores use the
training rows only. The choice and every candidate's inner scores go into the fold's log.

``healnet train`` scores the candidates itself, one after another, unless it is given the folder
where ``healnet search`` wrote each candidate's scores (``search/fold{k}/setting{i}.json``, this
module's format): the workflow runs one ``search`` job per fold and candidate, side by side on a
cluster, and the fold's ``train`` job reads their files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import KFold, StratifiedKFold

from healnet.evaluation.metrics import c_index
from healnet.models.loss import risk_from_logits
from healnet.settings import HealnetSettings, Settings, TrainingSettings
from healnet.training.cohort import Cohort
from healnet.training.fold import FoldInputs, fold_data, fold_inputs, fold_spec, inner_split, train_members
from healnet.training.scoring import all_flags, predict
from preprocessing.core.atomic import atomic_output
from preprocessing.core.errors import InputError

log = logging.getLogger(__name__)

_NOT_SEARCHABLE = {"search", "search_folds", "seed", "ensemble"}


def candidates(search: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the searched values, in the order the settings and values are listed."""
    keys = list(search)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(search[k] for k in keys))]


def with_choice(settings: Settings, choice: dict[str, Any]) -> Settings:
    """``settings`` with the chosen values put into the training or HEALNet section; InputError for
    a name that is neither (or one a search must not change)."""
    training = {f.name for f in dataclasses.fields(TrainingSettings)} - _NOT_SEARCHABLE
    healnet = {f.name for f in dataclasses.fields(HealnetSettings)}
    unknown = sorted(set(choice) - training - healnet)
    if unknown:
        raise InputError("training.search", f"cannot search {', '.join(unknown)}: not a training or healnet "
                                            "setting (seed, ensemble and the search itself are fixed)")
    typed = {k: _typed(k, getattr(settings.training if k in training else settings.healnet, k), v)
             for k, v in choice.items()}
    return dataclasses.replace(
        settings,
        training=dataclasses.replace(settings.training, **{k: v for k, v in typed.items() if k in training}),
        healnet=dataclasses.replace(settings.healnet, **{k: v for k, v in typed.items() if k in healnet}),
    )


def _typed(name: str, current: Any, value: Any) -> Any:
    """``value`` as the type of the setting's current value (a number written as text, such as
    Snakemake's "1e-4", becomes a number); InputError for a value of another kind."""
    if isinstance(current, bool) or current is None or not isinstance(current, int | float):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError("training.search", f"{name}: {value!r} is not a number") from None
    if isinstance(current, int):
        if not number.is_integer():
            raise InputError("training.search", f"{name}: {value!r} is not a whole number")
        return int(number)
    return number


def inner_folds(rows: np.ndarray, events: np.ndarray, k: int,
                seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit rows, score rows) of ``k`` inner folds of the outer training ``rows``; stratified by event
    when every inner fold can hold one of each."""
    counts = np.bincount(events[rows].astype(int), minlength=2)
    splitter = (StratifiedKFold(k, shuffle=True, random_state=seed % 2**32) if counts.min() >= k
                else KFold(k, shuffle=True, random_state=seed % 2**32))
    return [(np.sort(rows[a]), np.sort(rows[b])) for a, b in splitter.split(rows, events[rows])]


def inner_fold_inputs(outer: FoldInputs, cohort: Cohort, fit: np.ndarray, score: np.ndarray,
                      n_bins: int) -> FoldInputs:
    """An inner fold as a fold: trained on ``fit``, scored on ``score``, time bins fitted on ``fit``."""
    from preprocessing.omics.labels import TimeBins

    bins_model = TimeBins(n_bins).fit(outer.times[fit], outer.events[fit])
    return dataclasses.replace(
        outer, train_patients=[cohort.patients[r] for r in fit],
        test_patients=[cohort.patients[r] for r in score], train_rows=fit, test_rows=score,
        time_bins=bins_model,
        bins=np.asarray(bins_model.transform(outer.times), dtype=np.int64),
    )


def inner_c_index(cohort: Cohort, model_name: str, inner: FoldInputs, settings: Settings,
                  device: torch.device, scratch: Path, workers: int, cache_dir: Path | None) -> float:
    """Train ``model_name`` on an inner fold's fit rows and score its c-index on its score rows."""
    data = fold_data(cohort, model_name, inner, settings.training, cache_dir)
    rows = inner_split(data, inner, settings.training)
    trained = train_members(model_name, fold_spec(model_name, cohort, data, settings), data, inner, rows,
                            settings, device, scratch, workers)
    scored = inner.test_rows[(data.has_wsi | data.has_omics)[inner.test_rows]]
    logits = predict(trained.model, data.dataset, scored, device, {"full": all_flags(data.dataset, scored)},
                     workers)["full"]
    risk = risk_from_logits(torch.from_numpy(logits)).numpy()
    try:
        return c_index(inner.times[scored], inner.events[scored], risk)
    except ValueError:  # no comparable pair among these patients
        return float("nan")


def score_setting(cohort: Cohort, model_name: str, fold: int, settings: Settings, index: int,
                  device: torch.device, models_dir: Path, workers: int,
                  cache_dir: Path | None) -> dict[str, Any]:
    """Candidate ``index`` of ``training.search`` scored on fold ``fold``'s inner folds: its setting,
    the inner c-indices and their mean. Its inner fits save their state in folders of their own under
    ``models_dir/search-fold{fold}``, removed at the end."""
    grid = checked_grid(settings)
    if not 0 <= index < len(grid):
        raise InputError("--setting", f"training.search has {len(grid)} settings (0 to {len(grid) - 1}), "
                                      f"not {index}")
    # the fold's inputs made (and its generators seeded) afresh for each candidate, so that a candidate
    # scores the same whether it runs alone in a search job or after others in one process
    outer = fold_inputs(cohort, fold, settings.training.seed, settings.n_bins)
    splits = inner_folds(outer.train_rows, outer.events, settings.training.search_folds, outer.seed)
    chosen = with_choice(settings, grid[index])
    scratch = models_dir / f"search-fold{fold}"
    inners = [inner_fold_inputs(outer, cohort, fit, score, settings.n_bins) for fit, score in splits]
    log.info("fold %d, setting %d of %d %s: %d inner fits", fold, index, len(grid), grid[index], len(inners))
    started = time.perf_counter()
    try:
        scores = [inner_c_index(cohort, model_name, inner, chosen, device,
                                scratch / f"setting{index}-inner{k}", workers, cache_dir)
                  for k, inner in enumerate(inners)]
    finally:
        for k in range(len(splits)):
            shutil.rmtree(scratch / f"setting{index}-inner{k}", ignore_errors=True)
        with contextlib.suppress(OSError):
            scratch.rmdir()  # the last setting's job to finish removes the folder
    log.info("fold %d, setting %d: %.1f s per fit, inner c-index %s", fold, index,
             (time.perf_counter() - started) / len(inners), ", ".join(f"{v:.4f}" for v in scores))
    finite = [v for v in scores if np.isfinite(v)]
    return {"fold": fold, "index": index, "setting": grid[index], "inner_c_index": scores,
            "mean": float(np.mean(finite)) if finite else float("nan")}


def checked_grid(settings: Settings) -> list[dict[str, Any]]:
    """The candidates of ``training.search``, every name checked before anything is trained."""
    grid = candidates(settings.training.search or {})
    for choice in grid:
        with_choice(settings, choice)
    return grid


def choose(settings: Settings, fold: int, results: list[dict[str, Any]]) -> tuple[Settings, dict[str, Any]]:
    """The candidate with the best mean inner c-index (the first listed on a tie), as settings, and the
    search's log for the fold."""
    best = max(range(len(results)), key=lambda i: (np.nan_to_num(results[i]["mean"], nan=-np.inf), -i))
    chosen = results[best]["setting"]
    log.info("fold %d: chose %s (mean inner c-index %.4f)", fold, chosen, results[best]["mean"])
    logged = [{k: r[k] for k in ("setting", "inner_c_index", "mean")} for r in results]
    return with_choice(settings, chosen), {"chosen": chosen, "candidates": logged,
                                           "inner_folds": settings.training.search_folds}


def select_settings(cohort: Cohort, model_name: str, fold: int, settings: Settings, device: torch.device,
                    models_dir: Path, workers: int,
                    cache_dir: Path | None) -> tuple[Settings, dict[str, Any]]:
    """The settings chosen by inner cross-validation on fold ``fold``'s training patients, and the log:
    every candidate scored in this process, one after another."""
    grid = checked_grid(settings)
    n_inner = settings.training.search_folds
    log.info("fold %d: searching %d settings x %d inner folds = %d fits, then one on the whole training "
             "fold", fold, len(grid), n_inner, len(grid) * n_inner)
    results, started = [], time.perf_counter()
    for i in range(len(grid)):
        results.append(score_setting(cohort, model_name, fold, settings, i, device, models_dir, workers,
                                     cache_dir))
        if i == 0:
            per_fit = (time.perf_counter() - started) / n_inner
            log.info("fold %d: %.1f s per fit, about %.0f s for the search", fold, per_fit,
                     per_fit * len(grid) * n_inner)
    return choose(settings, fold, results)


def write_scores(path: Path, scores: dict[str, Any]) -> None:
    """Write one candidate's inner scores (:func:`score_setting`) to ``path``, atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(scores, indent=1) + "\n")


def read_scores(folder: Path, fold: int, settings: Settings) -> list[dict[str, Any]]:
    """Every candidate's inner scores of fold ``fold`` from ``folder/setting{i}.json`` (written by
    ``healnet search``); InputError for a missing file or one made by another search."""
    grid = checked_grid(settings)
    results = []
    for i, setting in enumerate(grid):
        path = folder / f"setting{i}.json"
        if not path.is_file():
            raise InputError(path, f"no inner scores of training.search setting {i} for fold {fold}: run "
                                   f"`healnet search --fold {fold} --setting {i}` first")
        try:
            scores = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise InputError(path, f"not a readable scores file ({err})") from None
        made_for = (scores.get("fold"), scores.get("setting"), len(scores.get("inner_c_index", [])))
        if made_for != (fold, setting, settings.training.search_folds):
            raise InputError(path, f"made for fold {made_for[0]}, setting {made_for[1]} and {made_for[2]} "
                                   f"inner folds, not this search's fold {fold}, {setting} and "
                                   f"{settings.training.search_folds}: rerun `healnet search`")
        results.append(scores)
    return results
