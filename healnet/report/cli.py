"""Figures and tables for one cohort (``healnet report``): what a pathologist looks at after a run.

- ``km_curves.png``: Kaplan-Meier curves of held-out patients, split at each fold's training-median risk,
  with the log-rank p-value (lifelines), one panel per model (per model and encoder when models were
  trained on several encoders' features);
- ``c_index.png``: c-index per model (and encoder) with one point per fold;
- ``attention_wsi.png``: HEALNet's per-patch cross-attention drawn over slide thumbnails (the HEALNet
  trained on ``--encoder``'s features);
- ``attention_omics.png``: the omic tokens HEALNet's cross-attention weighted most, and the omic
  features whose gradient x input moved its predicted risk most;
- ``failed_slides.csv`` (beside the figures folder): slides that gave no patches, and why.

The Snakemake rule ``report`` runs this; ``snakemake --report output/report.html`` then collects the figures,
the summary table and the tiling QC pictures into one HTML file.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd

from healnet.data.results import NO_ENCODER, find_runs, read_folds, run_name
from healnet.report import attention as explain
from healnet.report.figures import failed_slides, load_predictions, plot_c_index, plot_km_curves, write_csv
from preprocessing.core.errors import InputError
from preprocessing.slides.files import SlideFolderError, find_slide_files

log = logging.getLogger(__name__)


def build_arg_parser() -> argparse.ArgumentParser:
    """The ``healnet report`` argument parser."""
    p = argparse.ArgumentParser(prog="healnet report", description=__doc__.split("\n\n")[0])
    p.add_argument("--cohort", required=True)
    p.add_argument("--results-dir", type=Path, required=True, help="results/{cohort}")
    p.add_argument("--omics-dir", type=Path, required=True, help="omics/{cohort}")
    p.add_argument("--models-dir", type=Path, required=True, help="models/{cohort}")
    p.add_argument("--encoder", required=True,
                   help="the encoder whose HEALNet attention, stores and tiles are drawn and checked")
    p.add_argument("--features-dir", type=Path, required=True, help="features/{cohort}/{encoder}")
    p.add_argument("--tiles-dir", type=Path, required=True, help="tiles/{cohort}/{geometry} of that encoder")
    p.add_argument("--slides-dir", default="", help="folder of the cohort's slides (for thumbnails)")
    p.add_argument("--runs", default="",
                   help="comma-separated {encoder}/{model} folders; default: every run under --results-dir")
    p.add_argument("--top-omic-features", type=int, default=15)
    p.add_argument("--heatmap-slides", type=int, default=3)
    p.add_argument("-o", "--out", type=Path, required=True, help="figures folder")
    return p


def with_run_labels(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with ``model`` naming the run, "healnet (uni)", where models were trained on the
    features of more than one encoder; as it is otherwise."""
    encoders = set(frame["encoder"]) - {NO_ENCODER}
    if len(encoders) < 2:
        return frame
    pairs = zip(frame["model"], frame["encoder"], strict=True)
    labels = [m if e == NO_ENCODER else f"{m} ({e})" for m, e in pairs]
    return frame.assign(model=labels)


def cli(argv: list[str] | None = None) -> int:
    """Entry point of ``healnet report``; returns the exit status."""
    args = build_arg_parser().parse_args(argv)
    runs = [r for r in args.runs.split(",") if r] or find_runs(args.results_dir, "predictions.parquet")
    if not runs:
        raise InputError(args.results_dir, "no trained model results ({encoder}/{model}/predictions.parquet)")
    args.out.mkdir(parents=True, exist_ok=True)
    predictions = load_predictions(args.results_dir, runs)
    folds = read_folds(args.results_dir, runs)
    logrank = plot_km_curves(with_run_labels(predictions), args.out / "km_curves.png")
    write_csv(logrank, args.results_dir / "logrank.csv")
    plot_c_index(with_run_labels(folds), args.out / "c_index.png")
    slides = None  # without a readable slides folder (slides moved off after extraction): every tiles file
    if args.slides_dir:
        try:
            slides = set(find_slide_files(args.slides_dir))
        except SlideFolderError:
            pass
    failed = failed_slides(args.tiles_dir, args.features_dir, slides)
    write_csv(failed, args.results_dir / "failed_slides.csv")

    # Only a configured HEALNet is drawn: a checkpoint folder left over from an earlier run is not read.
    healnet_run = run_name(args.encoder, "healnet")
    is_healnet = (predictions["model"] == "healnet") & (predictions["encoder"] == args.encoder)
    healnet_preds = predictions[is_healnet]
    healnet_dir = args.models_dir / healnet_run if healnet_run in runs else None
    explain.draw_attention_figures(
        models_dir=healnet_dir, predictions=healnet_preds, omics_dir=args.omics_dir,
        features_dir=args.features_dir,
        tiles_dir=args.tiles_dir, slides_dir=Path(args.slides_dir) if args.slides_dir else None,
        wsi_path=args.out / "attention_wsi.png", omics_path=args.out / "attention_omics.png",
        n_slides=args.heatmap_slides, top_features=args.top_omic_features,
    )
    log.info("figures written to %s", args.out)
    return 0
