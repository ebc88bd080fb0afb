"""A linear yardstick for a cohort: ridge Cox models on the pipeline's own folds and inputs.

Why: at the sizes of most TCGA cohorts (tens of deaths per training fold) a deep survival model has
to beat a simple linear one before its architecture means anything. This script fits, per
held-out fold of ``splits.parquet``, three ridge-penalised Cox models (scikit-survival):

- ``slides``: each patient's patch features averaged over all patches of all its slides, then
  standardised and reduced to ``--components`` principal components, both fitted on the training
  patients that have slides;
- ``omics``: the fold's omic matrix exactly as the training harness builds it (log, imputation,
  scaling and the ``training.omic_max_features`` / ``omic_select_by`` screen of the config, fitted
  on the training patients); a config that keeps thousands of features needs
  ``--omic-max-features K``, as a Cox fit on them would take hours;
- ``both``: the two blocks side by side; a patient without one modality gets zeros there (the
  training mean, since both blocks are centred).

Each is scored by Harrell's c-index on every held-out patient, the same patients as the ``full``
rows of ``results/{cohort}/summary.md``. As there, a unimodal model gives a patient without its
modality the training-median risk. Where the pipeline's results are found (``ROOT/results/{cohort}``
or ``--results``), its models' mean c-index in the ``full`` setting is printed underneath. Labels
reach only the Cox fits and the omic screen, and only from training patients. Nothing is random.

    .venv/bin/python benchmarks/linear_reference.py COHORT [COHORT ...]
    .venv/bin/python benchmarks/linear_reference.py DEMO --root /path/to/run --config config.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.metrics import concordance_index_censored
from sksurv.util import Surv

from healnet.config import configured_encoders, load_config
from healnet.data.results import NO_ENCODER, find_runs, read_folds, split_run
from healnet.evaluation.summary import summarise
from healnet.settings import TrainingSettings, settings_from_config
from healnet.training.cohort import Cohort, fold_patients, prepare_cohort
from healnet.training.fold import fit_omics
from preprocessing.core.errors import InputError
from preprocessing.features.store import read_store

BLOCKS = ("slides", "omics", "both")
MAX_COX_COLUMNS = 256  # a Newton-Raphson Cox fit costs columns cubed: thousands of genes take hours


def pooled_features(cohort: Cohort) -> dict[str, np.ndarray]:
    """Per patient with patches: the mean feature vector over all patches of all its slides."""
    pooled = {}
    for patient, stores in zip(cohort.patients, cohort.bags, strict=True):
        if stores:
            total = sum(read_store(s.path)[0].astype(np.float64).sum(axis=0) for s in stores)
            pooled[patient] = total / sum(s.n for s in stores)
    return pooled


def c_index(survival: pd.DataFrame, patients: list[str], risk: np.ndarray) -> float:
    """Harrell's c-index of ``risk`` over ``patients``; NaN where no pair is comparable (no death)."""
    rows = survival.loc[patients]
    try:
        return float(concordance_index_censored(
            rows["event"].to_numpy(bool), rows["time"].to_numpy(float), risk
        )[0])
    except ValueError:  # every patient censored, or no comparable pair
        return float("nan")


def fold_blocks(
    cohort: Cohort, pooled: dict[str, np.ndarray], fold: int, training: TrainingSettings, components: int
) -> tuple[list[str], list[str], dict[str, dict[str, np.ndarray]]]:
    """(training patients, held-out patients, block name -> patient -> input row) of one fold."""
    survival = cohort.tables.manifest[["time", "event"]]
    train, held = fold_patients(cohort.tables, fold, set(cohort.patients))
    blocks: dict[str, tuple[dict[str, np.ndarray], int]] = {}
    with_slides = [p for p in train if p in pooled]
    if len(with_slides) > components:
        fitted = np.stack([pooled[p] for p in with_slides])
        scaler = StandardScaler().fit(fitted)
        pca = PCA(components, random_state=0).fit(scaler.transform(fitted))
        reduced = pca.transform(scaler.transform(np.stack(list(pooled.values()))))
        blocks["slides"] = (dict(zip(pooled, reduced, strict=True)), components)
    features = cohort.tables.features
    if cohort.has_omics.any():
        state = fit_omics(features, train, training, survival)
        if len(state.columns) > MAX_COX_COLUMNS:
            raise InputError(
                "training.omic_max_features",
                f"{len(state.columns)} omic columns reach the Cox fit (at most {MAX_COX_COLUMNS}); "
                "pass --omic-max-features K to screen them",
            )
        have = [p for p, has in zip(cohort.patients, cohort.has_omics, strict=True) if has]
        matrix = state.transform.transform(features.loc[have])[state.columns].to_numpy(np.float64)
        blocks["omics"] = (dict(zip(have, matrix, strict=True)), len(state.columns))
    if len(blocks) == 2:
        (slides, n_s), (omics, n_o) = blocks["slides"], blocks["omics"]
        joint = {
            p: np.concatenate([slides.get(p, np.zeros(n_s)), omics.get(p, np.zeros(n_o))])
            for p in set(slides) | set(omics)
        }
        blocks["both"] = (joint, n_s + n_o)
    return train, held, {name: values for name, (values, _) in blocks.items()}


def fold_scores(
    cohort: Cohort, pooled: dict[str, np.ndarray], fold: int, training: TrainingSettings, components: int,
    penalty: float,
) -> dict[str, float]:
    """The three ridge Cox models' c-index on one held-out fold."""
    survival = cohort.tables.manifest[["time", "event"]]
    train, held, blocks = fold_blocks(cohort, pooled, fold, training, components)
    scores = {}
    for name, values in blocks.items():
        fit_on = [p for p in train if p in values]
        rows = survival.loc[fit_on]
        model = CoxPHSurvivalAnalysis(alpha=penalty).fit(
            np.stack([values[p] for p in fit_on]),
            Surv.from_arrays(rows["event"].to_numpy(bool), rows["time"].to_numpy(float)),
        )
        median = float(np.median(model.predict(np.stack([values[p] for p in fit_on]))))
        risk = np.array([model.predict(values[p][None])[0] if p in values else median for p in held])
        scores[name] = c_index(survival, held, risk)
    return scores


def pipeline_means(results: Path, encoder: str) -> dict[str, float]:
    """Each model's mean c-index over folds in the ``full`` setting, as ``summary.md`` has it, on
    ``encoder``'s features for the models that read slides (none when no ``folds.csv`` is there)."""
    runs = [r for r in find_runs(results, "folds.csv") if split_run(r)[0] in (encoder, NO_ENCODER)]
    if not runs:
        return {}
    summary = summarise(read_folds(results, runs))
    full = summary[summary["setting"] == "full"]
    return dict(zip(full["model"], full["c_index_mean"].astype(float), strict=True))


def main(argv: list[str] | None = None) -> None:
    """Print the linear yardstick per cohort, and the pipeline's models when their results exist."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cohorts", nargs="+")
    parser.add_argument("--root", type=Path, default=Path("."), help="holds omics/, features/, results/")
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--components", type=int, default=4, help="principal components of pooled features")
    parser.add_argument("--penalty", type=float, default=10.0, help="ridge penalty of the Cox fits")
    parser.add_argument("--results", help="results folder, {cohort} filled in (ROOT/results/{cohort})")
    parser.add_argument("--omic-max-features", type=int, help="replaces training.omic_max_features")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    training = settings_from_config(config).training
    if args.omic_max_features is not None:
        training = dataclasses.replace(training, omic_max_features=args.omic_max_features)
    encoder = configured_encoders(config["extract"])[0]
    warnings.filterwarnings("ignore", module="sksurv")
    # the cohort's notes speak of training a model
    logging.getLogger("healnet.training.cohort").setLevel(logging.ERROR)
    for name in args.cohorts:
        features_dir = args.root / "features" / name / encoder
        cohort = prepare_cohort("healnet", args.root / "omics" / name, features_dir)
        pooled = pooled_features(cohort)
        folds = sorted(int(f) for f in cohort.tables.splits["fold"].unique())
        per_fold = [
            fold_scores(cohort, pooled, f, training, args.components, args.penalty) for f in folds
        ]
        found = [b for b in BLOCKS if all(b in s for s in per_fold)]
        means = {b: float(np.nanmean([s[b] for s in per_fold])) for b in found}
        line = "  ".join(f"{b} {v:.3f}" for b, v in means.items())
        if {"slides", "omics", "both"} <= set(means):
            line += f"  (both - better single {means['both'] - max(means['slides'], means['omics']):+.3f})"
        print(f"{name}: {len(cohort.patients)} patients, {len(folds)} folds; ridge Cox c-index: {line}")
        results = Path(args.results.format(cohort=name)) if args.results else args.root / "results" / name
        trained = pipeline_means(results, encoder)
        if trained:
            print("  pipeline, full setting: " + "  ".join(f"{m} {v:.3f}" for m, v in trained.items()))


if __name__ == "__main__":
    try:
        main()
    except InputError as err:
        raise SystemExit(f"linear_reference: error: {err}") from None
