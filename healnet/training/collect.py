"""Join the outputs of per-fold training runs into one model's results: ``healnet collect``.

The workflow trains every fold as its own job (``healnet train --folds k --results-dir
{model}/fold{k}``): a cancelled or failed job then costs one fold, not the finished ones, and a
cluster trains the folds side by side. This step writes what a single all-fold ``healnet train``
writes, ``{model}/folds.csv``, ``predictions.parquet`` and ``log.json``, from the per-fold folders,
checking that each folder holds exactly its own fold.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from healnet.config import TRAINING_RUN_SETTINGS
from healnet.evaluation.summary import check_folds_table
from preprocessing.core.atomic import atomic_output
from preprocessing.core.errors import InputError


def parse_folds(text: str | None) -> list[int] | None:
    """``--folds`` text (``0,2,4``) as fold numbers; None for all."""
    if not text:
        return None
    try:
        folds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise InputError("--folds", f"expected comma-separated integers, got {text!r}") from err
    if len(set(folds)) < len(folds):
        raise InputError("--folds", f"a fold is named twice in {text!r}")
    return folds


DESCRIBED = {"cohort": "cohort", "model": "model", "training": "training settings",
             "healnet": "HEALNet settings", "n_bins": "time bins"}


def run_description(log: dict[str, Any]) -> dict[str, Any]:
    """What must be the same for every fold of one model's results: cohort, model and the settings
    that change what is learnt (not the run settings such as readers, threads or the device)."""
    training = {k: v for k, v in log.get("training", {}).items() if k not in TRAINING_RUN_SETTINGS}
    return {"cohort": log.get("cohort"), "model": log.get("model"), "training": training,
            "healnet": log.get("healnet"), "n_bins": log.get("n_bins")}


def _read_fold(folder: Path, fold: int) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """One fold's metrics, predictions and log, each checked to be that fold's alone."""
    paths = [folder / "folds.csv", folder / "predictions.parquet", folder / "log.json"]
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


def collect_folds(results_dir: str | Path, folds: Sequence[int]) -> pd.DataFrame:
    """Write ``results_dir/{folds.csv, predictions.parquet, log.json}`` from ``results_dir/fold{k}/``.

    Returns the joined metrics table. The log keeps the first fold's run description (cohort,
    model, settings), sums the seconds and lists every fold's own log in fold order.
    """
    results_dir = Path(results_dir)
    if not folds:
        raise InputError("--folds", "no folds given")
    parts = [_read_fold(results_dir / f"fold{k}", k) for k in sorted(folds)]
    first = run_description(parts[0][2])
    for k, (metrics_k, _, log_k) in zip(sorted(folds), parts, strict=True):
        described = run_description(log_k)
        differs = [DESCRIBED[key] for key in first if described[key] != first[key]]
        other_model = "model" in metrics_k and set(metrics_k["model"]) != {first["model"]}
        if other_model and DESCRIBED["model"] not in differs:
            differs.append(DESCRIBED["model"])
        if differs:
            raise InputError(results_dir / f"fold{k}", f"another run than fold {min(folds)}: different "
                                                       f"{', '.join(differs)}; retrain this fold")
    metrics = pd.concat([p[0] for p in parts], ignore_index=True)
    predictions = pd.concat([p[1] for p in parts], ignore_index=True)
    log = {k: v for k, v in parts[0][2].items() if k not in ("seconds", "folds")}
    log["seconds"] = round(sum(float(p[2].get("seconds", 0.0)) for p in parts), 2)
    log["folds"] = [entry for p in parts for entry in p[2].get("folds", [])]
    with atomic_output(results_dir / "folds.csv") as tmp:
        metrics.to_csv(tmp, index=False)
    with atomic_output(results_dir / "predictions.parquet") as tmp:
        predictions.to_parquet(tmp, index=False)
    with atomic_output(results_dir / "log.json") as tmp:
        tmp.write_text(json.dumps(log, indent=1, default=float))
    return metrics


def cli(argv: list[str] | None = None) -> int:
    """``healnet collect --results-dir results/{cohort}/{model} --folds 0,1,2,3,4``."""
    parser = argparse.ArgumentParser(prog="healnet collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", required=True, type=Path, help="results/{cohort}/{model}")
    parser.add_argument("--folds", required=True, help="comma-separated fold numbers")
    args = parser.parse_args(argv)
    metrics = collect_folds(args.results_dir, parse_folds(args.folds) or [])
    full = metrics[(metrics["setting"] == "full") & (metrics["metric"] == "c_index")]["value"]
    print(f"{args.results_dir}: c-index {full.mean():.4f} ± {full.std(ddof=0):.4f} over {len(full)} fold(s)")
    return 0
