"""How much could averaging the two unimodal models add? An optimistic ceiling, per cohort.

Reads the held-out predictions of the omic SNN and the WSI ABMIL (``predictions.parquet``, setting
``full``) from one or more results folders, standardises each model's risk within each held-out
fold, and scores ``(1 - w) * abmil + w * snn`` for w = 0, 0.1, ..., 1 by the mean c-index over the
folds. The weight is chosen on the held-out folds themselves, which no honest model can do, so the
best mix is an upper bound for a weighted average of what the two learners found. If even that
bound beats the better unimodal model by less than a margin, a fusion model needs to learn more
from each modality, not only combine them better. The equal-weight mix, a choice made in advance,
is printed too: an honest late fusion that needs no tuning. HEALNet's own margin is printed alongside when
its predictions are there.

    .venv/bin/python benchmarks/fusion_ceiling.py results/COHORT [results/OTHER ...] [--encoder NAME]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from sksurv.metrics import concordance_index_censored

from healnet.data.results import NO_ENCODER
from healnet.modalities import MODEL_MODALITIES

WEIGHTS = np.round(np.linspace(0.0, 1.0, 11), 1)


def held_out(results: Path, model: str, encoder: str) -> pd.DataFrame | None:
    """One model's held-out predictions in the full setting, indexed by (fold, patient): the run on
    ``encoder``'s features for a model that reads slides."""
    run = results / (encoder if "wsi" in MODEL_MODALITIES[model] else NO_ENCODER) / model
    path = run / "predictions.parquet"
    if not path.exists():
        return None
    frame = pd.read_parquet(path)
    return frame[frame["setting"] == "full"].set_index(["fold", "patient"]).sort_index()


def mean_c_index(frame: pd.DataFrame, risk: pd.Series) -> float:
    """Mean over folds of Harrell's c-index of ``risk`` (same index as ``frame``)."""
    values = []
    for fold, rows in frame.groupby(level="fold"):
        values.append(concordance_index_censored(
            rows["event"].astype(bool).to_numpy(), rows["time"].to_numpy(), risk.loc[fold].to_numpy()
        )[0])
    return float(np.mean(values))


def standardised(risk: pd.Series) -> pd.Series:
    """Risk minus its fold mean, over its fold standard deviation."""
    by_fold = risk.groupby(level="fold")
    return (risk - by_fold.transform("mean")) / by_fold.transform("std").replace(0.0, 1.0)


def ceiling(results: Path, encoder: str) -> str:
    """One line: unimodal c-indices, the best mix and its weight, HEALNet's margin when present."""
    snn, abmil = held_out(results, "snn", encoder), held_out(results, "abmil", encoder)
    if snn is None or abmil is None:
        return f"{results}: needs snn and abmil predictions"
    index = snn.index.intersection(abmil.index)
    frame = abmil.loc[index]
    z_snn, z_abmil = standardised(snn.loc[index, "risk"]), standardised(abmil.loc[index, "risk"])
    scores = {w: mean_c_index(frame, (1 - w) * z_abmil + w * z_snn) for w in WEIGHTS}
    best_w = max(scores, key=scores.get)
    best_unimodal = max(scores[0.0], scores[1.0])
    line = (f"{results}: abmil {scores[0.0]:.3f}  snn {scores[1.0]:.3f}  best mix {scores[best_w]:.3f} "
            f"(w_snn={best_w:.1f}, +{scores[best_w] - best_unimodal:.3f} over the better one; "
            f"w_snn=0.5 fixed in advance: {scores[0.5] - best_unimodal:+.3f})")
    healnet = held_out(results, "healnet", encoder)
    if healnet is not None:
        healnet = healnet.loc[healnet.index.intersection(index)]
        margin = mean_c_index(healnet, healnet["risk"]) - best_unimodal
        line += f"  healnet {margin:+.3f}"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="results/{cohort} folders")
    parser.add_argument("--encoder", default="efficientnet_lite0", help="the slide models' encoder")
    args = parser.parse_args()
    for results in args.results:
        print(ceiling(results, args.encoder), flush=True)


if __name__ == "__main__":
    main()
