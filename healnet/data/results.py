"""A model's results files: ``folds.csv``, ``predictions.parquet`` and ``log.json``.

``healnet train`` writes them for the folds it trains, ``healnet collect`` joins the per-fold ones,
``healnet evaluate`` and ``healnet report`` read them. This module is the one place their columns
are named and they are written and read. Each run (a model trained on one encoder's features) has
its own folder, ``{encoder}/{model}`` (:func:`run_name`).

- ``folds.csv``: one row per fold x setting x metric (:data:`FOLD_COLUMNS`).
- ``predictions.parquet``: one row per held-out patient x fold x setting (:data:`PREDICTION_COLUMNS`).
- ``log.json``: the run (cohort, model, device, notes, learning, run and HEALNet settings, time bins,
  seconds) and every fold's own log (sizes, per-epoch losses and timings).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from preprocessing.core.atomic import atomic_output
from preprocessing.core.errors import InputError, one_line

# Every column of folds.csv, and those a reader needs (the counts are for people reading the table).
FOLD_COLUMNS = ("model", "fold", "setting", "metric", "value", "note", "n_patients", "n_events",
                "n_imputed")
REQUIRED_FOLD_COLUMNS = ("model", "fold", "setting", "metric", "value")
# Every column of predictions.parquet, and those the report needs.
PREDICTION_COLUMNS = ("patient", "fold", "setting", "risk", "time", "event", "train_median_risk", "imputed")
REQUIRED_PREDICTION_COLUMNS = PREDICTION_COLUMNS[:-1]
RESULT_FILES = ("folds.csv", "predictions.parquet", "log.json")
# Results and checkpoints lie in one folder per run, results/{cohort}/{encoder}/{model}/ (and
# models/{cohort}/{encoder}/{model}/): the encoder whose feature stores the model read, or this
# word for a model that reads no slides.
NO_ENCODER = "none"


def write_results(results_dir: Path, metrics: pd.DataFrame, predictions: pd.DataFrame,
                  log: dict[str, Any]) -> None:
    """Write ``results_dir/{folds.csv, predictions.parquet, log.json}``, each atomically."""
    results_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(results_dir / "folds.csv") as tmp:
        metrics.to_csv(tmp, index=False)
    with atomic_output(results_dir / "predictions.parquet") as tmp:
        predictions.to_parquet(tmp, index=False)
    with atomic_output(results_dir / "log.json") as tmp:
        tmp.write_text(json.dumps(log, indent=1, default=float))


def c_index_summary(metrics: pd.DataFrame) -> str:
    """``c-index mean ± std over N fold(s)`` of a ``folds.csv`` table's full-setting c-indices."""
    full = metrics[(metrics["setting"] == "full") & (metrics["metric"] == "c_index")]["value"]
    return f"c-index {full.mean():.4f} ± {full.std(ddof=0):.4f} over {len(full)} fold(s)"


def check_folds_table(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """``frame`` (a ``folds.csv``) if it has the columns, whole fold numbers and numeric values (NaN
    allowed: a metric a fold cannot define); otherwise an InputError naming ``path``."""
    missing = [c for c in REQUIRED_FOLD_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(path, f"missing columns {missing}")
    for column in ("fold", "value"):
        numbers = pd.to_numeric(frame[column], errors="coerce")
        bad = numbers.isna() & frame[column].notna()
        if column == "fold":
            bad |= numbers.isna() | (numbers != numbers.round())
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(path, f"column {column!r} holds {frame[column].iloc[row]!r} (row {row + 2}), "
                                   "not a number; retrain to rewrite it")
        frame[column] = numbers.astype(int) if column == "fold" else numbers.astype(float)
    if frame["setting"].isna().any() or frame["metric"].isna().any():
        raise InputError(path, "empty 'setting' or 'metric' cells; retrain to rewrite it")
    return frame


def run_name(encoder: str, model: str) -> str:
    """A run's folder under ``results/{cohort}`` (and ``models/{cohort}``): ``{encoder}/{model}``."""
    return f"{encoder}/{model}"


def split_run(run: str) -> tuple[str, str]:
    """(encoder, model) of a run folder name ``{encoder}/{model}``; ValueError for other text."""
    parts = run.strip("/").split("/")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"a run is {{encoder}}/{{model}}, e.g. {NO_ENCODER}/snn: {run!r}")
    return parts[0], parts[1]


def find_runs(results_dir: Path, file_name: str) -> list[str]:
    """Every ``{encoder}/{model}`` folder of ``results_dir`` that holds ``file_name``, sorted."""
    return sorted(run_name(p.parent.parent.name, p.parent.name) for p in results_dir.glob(f"*/*/{file_name}"))


def read_folds(results_dir: Path, runs: list[str] | None) -> pd.DataFrame:
    """All ``folds.csv`` tables of a cohort (the given ``{encoder}/{model}`` runs, or every one found),
    with the columns ``model`` and ``encoder`` set from the run's folder."""
    if not results_dir.is_dir():
        raise InputError(results_dir, "results folder does not exist")
    if runs is None:
        runs = find_runs(results_dir, "folds.csv")
        if not runs:
            raise InputError(results_dir, "no {encoder}/{model}/folds.csv found")
    frames = []
    for run in runs:
        encoder, model = split_run(run)
        path = results_dir / run / "folds.csv"
        if not path.is_file():
            raise InputError(path, f"missing: train model {model} on {encoder} features first")
        try:
            frame = pd.read_csv(path)
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise InputError(path, f"cannot read CSV: {err}") from err
        frames.append(check_folds_table(frame, path).assign(model=model, encoder=encoder))
    return pd.concat(frames, ignore_index=True)


def read_predictions(path: Path) -> pd.DataFrame:
    """One model's held-out predictions, with the columns the report needs (else an InputError)."""
    if not path.exists():
        raise InputError(path, "missing: train this model first")
    try:
        frame = pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - any reader failure means an unusable file
        raise InputError(path, f"cannot read predictions ({one_line(err)}); retrain this model") from err
    missing = [c for c in REQUIRED_PREDICTION_COLUMNS if c not in frame]
    if missing:
        raise InputError(path, f"missing columns {missing}; retrain this model")
    return frame


def read_fold_results(folder: Path, fold: int) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """One fold's metrics, predictions and log (``healnet train --folds k`` wrote them to ``folder``),
    each checked to be that fold's alone."""
    paths = [folder / name for name in RESULT_FILES]
    for path in paths:
        if not path.is_file():
            raise InputError(path, f"missing: train fold {fold} first (healnet train --folds {fold})")
    try:
        metrics = pd.read_csv(paths[0])
        predictions = pd.read_parquet(paths[1])
        log = json.loads(paths[2].read_text())
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise InputError(folder, f"cannot read the fold's outputs ({type(err).__name__}: {err})") from err
    check_folds_table(metrics, paths[0])
    if not isinstance(log, dict) or not isinstance(log.get("seconds", 0.0), int | float):
        raise InputError(paths[2], "not a training log (a JSON object with numeric 'seconds'); "
                                   "retrain the fold")
    for path, frame in ((paths[0], metrics), (paths[1], predictions)):
        fold_numbers = pd.to_numeric(frame["fold"], errors="coerce") if "fold" in frame else pd.Series([])
        if fold_numbers.isna().any():
            raise InputError(path, "column 'fold' holds a value that is not a number; retrain the fold")
        found = sorted(set(fold_numbers.astype(int)))
        if found != [fold]:
            raise InputError(path, f"holds fold(s) {found}, expected only fold {fold}")
    return metrics, predictions, log


def search_choices(results_dir: Path, runs: list[str]) -> pd.DataFrame:
    """What ``training.search`` chose per run and fold (from each run's ``log.json``): columns
    ``model``, ``encoder``, ``fold``, ``chosen`` (``name=value, ...``), ``inner_c_index``; no rows when
    no run searched. An unreadable log is skipped: evaluation does not depend on it."""
    rows = []
    for run in runs:
        encoder, model = split_run(run)
        try:
            folds = json.loads((results_dir / run / "log.json").read_text()).get("folds", [])
        except (OSError, ValueError):
            continue
        for fold in folds:
            search = fold.get("search") if isinstance(fold, dict) else None
            if not search:
                continue
            best = next((c["mean"] for c in search["candidates"] if c["setting"] == search["chosen"]), np.nan)
            chosen = ", ".join(f"{k}={v}" for k, v in search["chosen"].items())
            rows.append({"model": model, "encoder": encoder, "fold": fold.get("fold"), "chosen": chosen,
                         "inner_c_index": best})
    return pd.DataFrame(rows, columns=["model", "encoder", "fold", "chosen", "inner_c_index"])
