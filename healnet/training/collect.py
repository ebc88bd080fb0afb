"""Join the outputs of per-fold training runs into one model's results: ``healnet collect``.

The workflow trains every fold as its own job (``healnet train --folds k --results-dir
{model}/fold{k}``): a cancelled or failed job then costs one fold, not the finished ones, and a
cluster trains the folds side by side. This step writes what a single all-fold ``healnet train``
writes, ``{model}/folds.csv``, ``predictions.parquet`` and ``log.json``, from the per-fold folders,
checking that each folder holds exactly its own fold.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from healnet.data.results import c_index_summary, read_fold_results, write_results
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
    that change what is learnt (``training``; the run settings such as readers, threads or the
    device are logged apart, under ``run``)."""
    return {"cohort": log.get("cohort"), "model": log.get("model"), "training": log.get("training"),
            "healnet": log.get("healnet"), "n_bins": log.get("n_bins")}


def collect_folds(results_dir: str | Path, folds: Sequence[int]) -> pd.DataFrame:
    """Write ``results_dir/{folds.csv, predictions.parquet, log.json}`` from ``results_dir/fold{k}/``.

    Returns the joined metrics table. The log keeps the first fold's run description (cohort,
    model, settings), sums the seconds and lists every fold's own log in fold order.
    """
    results_dir = Path(results_dir)
    if not folds:
        raise InputError("--folds", "no folds given")
    parts = [read_fold_results(results_dir / f"fold{k}", k) for k in sorted(folds)]
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
    write_results(results_dir, metrics, predictions, log)
    return metrics


def cli(argv: list[str] | None = None) -> int:
    """``healnet collect --results-dir results/{cohort}/{model} --folds 0,1,2,3,4``."""
    parser = argparse.ArgumentParser(prog="healnet collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", required=True, type=Path, help="results/{cohort}/{model}")
    parser.add_argument("--folds", required=True, help="comma-separated fold numbers")
    args = parser.parse_args(argv)
    metrics = collect_folds(args.results_dir, parse_folds(args.folds) or [])
    print(f"{args.results_dir}: {c_index_summary(metrics)}")
    return 0
