"""`healnet omics` on the real TCGA-LUAD MCAT table and its five published splits (../shared/data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from workflow_runner import snakemake

from preprocessing.omics.cli import cli
from preprocessing.omics.labels import fold_time_bins
from preprocessing.omics.transforms import fit_fold


@pytest.fixture(scope="module")
def table(shared_data: Path) -> Path:
    """The TCGA-LUAD MCAT table (skips without ../shared/data, fails without it under CI)."""
    return shared_data / "omics" / "tcga_luad_all_clean.csv.zip"


@pytest.fixture(scope="module")
def splits_dir(shared_data: Path) -> Path:
    """The folder of its five published splits, ``splits_{k}.csv``."""
    return shared_data / "omics" / "tcga_luad_splits"


@pytest.fixture(scope="module")
def luad(tmp_path_factory: pytest.TempPathFactory, table: Path, splits_dir: Path) -> dict:
    """Run the command once per module (with covariates and the shipped splits) and read its outputs."""
    out = tmp_path_factory.mktemp("luad")
    assert cli(["--cohort", "LUAD", "--omics", str(table), "--splits", str(splits_dir),
                "--clinical-covariates", "age,is_female", "-o", str(out)]) == 0
    raw = pd.read_csv(table)
    return {
        "out": out,
        "raw": raw,
        "manifest": pd.read_parquet(out / "manifest.parquet"),
        "features": pd.read_parquet(out / "features.parquet"),
        "splits": pd.read_parquet(out / "splits.parquet"),
        "summary": json.loads((out / "summary.json").read_text()),
    }


def test_counts_match_the_table(luad: dict) -> None:
    manifest, summary = luad["manifest"], luad["summary"]
    assert len(manifest) == 453 and manifest["patient"].is_unique
    assert list(manifest["patient"]) == sorted(manifest["patient"])
    assert manifest["patient"].str.len().eq(12).all()
    assert sum(len(s) for s in manifest["slide_ids_listed"]) == 516
    assert summary["slides"]["slides_listed_in_table"] == 516
    assert summary["genes_per_modality"] == {"rna": 2812, "cnv": 284}
    # no slides folder given: nothing counts as a usable slide, the listed ids are kept aside
    assert not manifest["has_wsi"].any() and manifest["slides"].map(len).eq(0).all()
    assert manifest["has_omics"].all() and not manifest["has_mut"].any()


def test_survival_labels_are_months_and_events(luad: dict) -> None:
    raw = luad["raw"].drop_duplicates("case_id").set_index("case_id")
    manifest = luad["manifest"].set_index("patient")
    assert np.allclose(manifest["time"], raw.loc[manifest.index, "survival_months"])
    assert (manifest["event"] == 1 - raw.loc[manifest.index, "censorship"].astype(int)).all()
    assert luad["summary"]["censoring"]["events"] == int(manifest["event"].sum())


def test_features_hold_omics_and_only_asked_clinical_columns(luad: dict) -> None:
    features, raw = luad["features"], luad["raw"]
    assert features.index.name == "patient" and len(features) == 453
    assert (features.dtypes == np.float32).all()
    prefixes = pd.Series(features.columns).str.split(":").str[0].value_counts().to_dict()
    assert prefixes == {"rna": 2812, "cnv": 284, "clin": 2}
    assert {"clin:age", "clin:is_female"} <= set(features.columns)
    assert not any(c.split(":", 1)[1] in {"age", "is_female", "site", "Unnamed: 0"}
                   for c in features.columns if not c.startswith("clin:"))
    row = raw.iloc[0]
    assert features.at[row["case_id"], "rna:AAK1"] == pytest.approx(row["AAK1_rnaseq"], rel=1e-6)
    # 10 slide rows lack age; their patients keep NaN for the transform to impute
    assert features["clin:age"].isna().sum() == raw.drop_duplicates("case_id")["age"].isna().sum()


def test_no_covariates_unless_asked(luad: dict, table: Path, tmp_path: Path) -> None:
    assert cli(["--cohort", "LUAD", "--omics", str(table), "-o", str(tmp_path)]) == 0
    features = pd.read_parquet(tmp_path / "features.parquet")
    assert not [c for c in features.columns if c.startswith("clin:")]
    assert features.shape == (453, 2812 + 284)
    generated = pd.read_parquet(tmp_path / "splits.parquet")
    assert generated.groupby("fold")["patient"].nunique().eq(453).all()


def test_shipped_splits_read_back_exactly(luad: dict, splits_dir: Path) -> None:
    splits = luad["splits"]
    assert sorted(splits["fold"].unique()) == [0, 1, 2, 3, 4]
    for k in range(5):
        csv = pd.read_csv(splits_dir / f"splits_{k}.csv")
        fold = splits[splits["fold"] == k]
        for role in ("train", "val"):
            assert set(fold.loc[fold["role"] == role, "patient"]) == set(csv[role].dropna())
    assert luad["summary"]["splits"]["folds"][0]["val"]["patients"] == 91


def test_fold_fitting_ignores_validation_values(luad: dict) -> None:
    features, splits, manifest = luad["features"], luad["splits"], luad["manifest"]
    val = splits.loc[(splits["fold"] == 0) & (splits["role"] == "val"), "patient"]
    before = fit_fold(features, splits, 0, max_features_per_modality=200).state_dict()
    bins_before = fold_time_bins(manifest, splits)[0].state_dict()
    changed = features.copy()
    changed.loc[val] = changed.loc[val] * 1000
    changed.loc[val[:20], "rna:AAK1"] = np.nan
    moved = manifest.copy()
    moved.loc[moved["patient"].isin(val), "time"] *= 50
    after = fit_fold(changed, splits, 0, max_features_per_modality=200).state_dict()
    assert before["feature_names"] == after["feature_names"] and len(before["feature_names"]) == 200 + 200 + 2
    for key in ("fill", "mean", "std"):
        assert np.array_equal(before[key], after[key])
    assert fold_time_bins(moved, splits)[0].state_dict() == bins_before
    # and the validation rows were really different (the comparison above could have failed)
    assert not np.array_equal(features.loc[val, "rna:AAK1"].to_numpy(),
                              changed.loc[val, "rna:AAK1"].to_numpy())


def test_shipped_luad_config_runs_through_the_workflow(table: Path, splits_dir: Path, tmp_path: Path) -> None:
    """workflow/configs/luad_omics.yaml as a user runs it (here the SNN only, one epoch, the recipe's
    search over two of its settings with two inner folds), through to the report: one search job per
    fold and candidate, announced when the run starts, and each fold's choice in its log. Two things
    once broke this omics-only path: the weight decay of 0.00001 reaches the training jobs as JSON
    ("1e-05"), which stopped every fold with "not of type number"; and with no slides folder the
    report rule passed an empty --slides-dir."""
    repo = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((repo / "workflow" / "configs" / "luad_omics.yaml").read_text())
    config["cohorts"]["LUAD"] = {"omics": str(table.resolve()), "splits": str(splits_dir.resolve())}
    config["models"] = ["snn"]
    config["training"]["epochs"] = 1
    config["training"]["search"] = {"omic_max_features": config["training"]["search"]["omic_max_features"]}
    config["training"]["search_folds"] = 2  # what the search chooses: tests/test_search.py
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = snakemake(tmp_path, "--cores", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "training.search: 10 search jobs (a candidate on a fold each), 20 inner fits" in run.stderr
    assert len(list((tmp_path / "output/results/LUAD/none/snn/search").glob("fold*/setting*.json"))) == 10
    log = json.loads((tmp_path / "output/results/LUAD/none/snn/log.json").read_text())
    assert all(fold["search"]["chosen"]["omic_max_features"] in (32, 256) for fold in log["folds"])
    snapshot = json.loads((tmp_path / "output/results/LUAD/none/snn/config.json").read_text())
    assert snapshot["training"]["weight_decay"] == 1e-05
    folds = pd.read_csv(tmp_path / "output/results/LUAD/none/snn/folds.csv")
    c_index = folds[(folds["setting"] == "full") & (folds["metric"] == "c_index")]
    assert c_index["fold"].tolist() == [0, 1, 2, 3, 4]
    assert c_index["value"].between(0.0, 1.0, inclusive="neither").all()
    assert (tmp_path / "output" / "results" / "LUAD" / "figures" / "km_curves.png").stat().st_size > 0
