"""``healnet omics``: clinical + omic tables + slides -> manifest, feature matrix, folds, summary.

Writes the omics folder OUT_DIR (:mod:`preprocessing.omics.directory`; each file atomically, all
computed before the first is written):
``manifest.parquet`` (one row per patient), ``features.parquet`` (patients with omics x
``{modality}:{gene}``), ``splits.parquet`` (fold, patient, role) and ``summary.json`` (counts,
missing modalities, censoring, failed slides, per-fold time-bin cut points).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from preprocessing.core.errors import InputError
from preprocessing.omics.barcodes import describe_rows
from preprocessing.omics.cohort_tables import MODALITIES, CohortTables
from preprocessing.omics.directory import write_omics_dir
from preprocessing.omics.join import build_features, build_manifest, list_slide_files, read_slide_list
from preprocessing.omics.labels import fold_time_bins
from preprocessing.omics.readers import read_omics
from preprocessing.omics.splits import check_splits, generate_splits, read_splits

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``healnet omics``."""
    parser = argparse.ArgumentParser(
        prog="healnet omics",
        description="Join clinical and omic tables per patient, match slides by barcode, and define folds.",
    )
    parser.add_argument("--cohort", required=True, help="cohort name (for logs and the summary)")
    parser.add_argument("--omics", required=True, type=Path,
                        help="one MCAT-style table (.csv/.csv.zip/.csv.gz/.tsv) or a folder of tables")
    slides = parser.add_mutually_exclusive_group()
    slides.add_argument("--slides", type=Path, help="folder of slide files (listed by name only)")
    slides.add_argument("--slide-list", type=Path, help="text file: one slide file name or path per line")
    parser.add_argument("--tiles-dir", type=Path,
                        help="tiling outputs {slide_stem}.parquet: slides without patches count as unusable")
    parser.add_argument("--features-dir", type=Path,
                        help="feature stores {slide_stem}.zarr, for features imported without tiles: "
                             "the slides (unless --slides or --slide-list names them), and those "
                             "without patches count as unusable")
    parser.add_argument("--splits", type=Path, help="folder of splits_{k}.csv (columns train, val); "
                                                    "default: generate stratified folds")
    parser.add_argument("--n-folds", type=int, default=5, help="folds to generate (default 5)")
    parser.add_argument("--n-bins", type=int, default=4, help="survival time bins (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated folds (default 0)")
    parser.add_argument("--clinical-covariates", default="",
                        help="comma-separated clinical columns added as clin:{name} features (age,is_female)")
    parser.add_argument("--include-silent-mutations", action="store_true",
                        help="count silent/UTR/intron variants of a MAF as mutations too")
    parser.add_argument("-o", "--out", required=True, type=Path, help="output folder")
    return parser


def _count_summary(
    cohort: str, tables: CohortTables, manifest: pd.DataFrame, features: pd.DataFrame, info: dict[str, Any]
) -> dict[str, Any]:
    n = len(manifest)
    per_modality = {"wsi": int(manifest["has_wsi"].sum()), "omics": int(manifest["has_omics"].sum())}
    per_modality.update({m: int(manifest[f"has_{m}"].sum()) for m in MODALITIES})
    per_modality["wsi_and_omics"] = int((manifest["has_wsi"] & manifest["has_omics"]).sum())
    present = [m for m in MODALITIES if m in tables.omics]
    columns = {m: [c for c in features.columns if c.startswith(f"{m}:")] for m in present}
    genes = {m: len(cols) for m, cols in columns.items()}
    missing_values = {m: int(features[cols].isna().to_numpy().sum()) for m, cols in columns.items()}
    events = int(manifest["event"].sum())
    barcodes = {
        m: {k: (len(v) if isinstance(v, list) else v) for k, v in note.items() if k != "chosen_samples"}
        for m, note in tables.notes.items()
    }
    without_survival = info["omic_patients_without_survival"]
    return {
        "cohort": cohort,
        "layout": tables.layout,
        "sources": tables.sources,
        "patients": n,
        "patients_dropped_no_survival": tables.dropped_no_survival,
        "patients_without_any_modality": manifest.loc[~manifest["has_data"], "patient"].tolist(),
        "slides": {k: v for k, v in info.items() if k != "omic_patients_without_survival"},
        "omic_patients_without_survival": {m: len(v) for m, v in without_survival.items()},
        "patients_per_modality": per_modality,
        "patients_missing_modality": {k: n - per_modality[k] for k in ("wsi", "omics", *present)},
        "genes_per_modality": genes,
        "missing_values_in_features": missing_values,
        "clinical_covariates": [c.split(":", 1)[1] for c in features.columns if c.startswith("clin:")],
        "barcodes": barcodes,
        "censoring": {
            "events": events,
            "censored": n - events,
            "censored_fraction": round((n - events) / n, 4) if n else None,
            "time_months": {"min": float(manifest["time"].min()), "median": float(manifest["time"].median()),
                            "max": float(manifest["time"].max())},
        },
    }


def cli(argv: list[str] | None = None) -> int:
    """Run ``healnet omics``; returns the exit status (InputError propagates to healnet.cli)."""
    args = build_parser().parse_args(argv)
    covariates = [c.strip() for c in args.clinical_covariates.split(",") if c.strip()]
    if args.n_bins < 1:
        raise InputError("--n-bins", f"must be at least 1, got {args.n_bins}")
    for folder, what in ((args.tiles_dir, "tiles"), (args.features_dir, "feature store")):
        if folder is not None and not folder.is_dir():
            raise InputError(folder, f"{what} folder not found")

    tables = read_omics(args.omics, include_silent=args.include_silent_mutations)
    if args.slides is not None:
        stems, source = list_slide_files(args.slides), str(args.slides)
    elif args.slide_list is not None:
        stems, source = read_slide_list(args.slide_list), str(args.slide_list)
    else:
        stems, source = None, "slides"
    manifest, info = build_manifest(tables, stems, source, args.tiles_dir, args.features_dir)
    features = build_features(tables, manifest, covariates)

    if args.splits is not None:
        splits = read_splits(args.splits, manifest["patient"])
        n_folds = int(splits["fold"].nunique())
        if n_folds != args.n_folds:
            log.info("%d folds from %s (--n-folds %d not used)", n_folds, args.splits, args.n_folds)
        split_source = str(args.splits)
    else:
        splits = generate_splits(manifest, args.n_folds, args.seed, args.n_bins)
        n_folds, split_source = args.n_folds, "generated"
    check_splits(splits, manifest["patient"])
    bins = fold_time_bins(manifest, splits, args.n_bins)

    summary = _count_summary(args.cohort, tables, manifest, features, info)
    labels = manifest.set_index("patient")
    folds = []
    for k in range(n_folds):
        part = splits[splits["fold"] == k]
        fold: dict[str, Any] = {"fold": k, "time_bin_cuts_months": bins[k].cuts_}
        for role in ("train", "val"):
            who = labels.loc[part.loc[part["role"] == role, "patient"]]
            per_bin = np.bincount(bins[k].transform(who["time"]), minlength=args.n_bins)
            fold[role] = {"patients": len(who), "events": int(who["event"].sum()),
                          "with_omics": int(who["has_omics"].sum()), "with_wsi": int(who["has_wsi"].sum()),
                          "per_time_bin": per_bin.tolist()}
        folds.append(fold)
    summary["splits"] = {"source": split_source, "n_folds": n_folds, "n_bins": args.n_bins,
                         "seed": args.seed if split_source == "generated" else None, "folds": folds}

    for key, count in summary["patients_missing_modality"].items():
        log.info("%s: %d of %d patients have no %s", args.cohort, count, len(manifest), key)
    if info["failed_slides"]:
        log.warning("%d slide(s) unusable: %s", len(info["failed_slides"]),
                    describe_rows(f"{f['slide']} ({f['reason']})" for f in info["failed_slides"]))

    out = args.out
    write_omics_dir(out, manifest, features, splits, summary)
    log.info("%s: %d patients (%d with slides, %d with omics), %d folds -> %s", args.cohort, len(manifest),
             summary["patients_per_modality"]["wsi"], summary["patients_per_modality"]["omics"], n_folds, out)
    return 0
