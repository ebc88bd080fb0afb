"""``healnet report`` (healnet.report: cli, figures, attention): only the models it is given, the
slides whose extraction failed, an unreadable predictions file, Kaplan-Meier groups of scored
patients only, and one attention panel per chosen patient."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from factory import as_runs, shared_cohort, shared_run, write_feature_store
from helpers import raises_one_line_error

from healnet.report import attention as explain

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_report_draws_only_the_models_it_is_given(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model dropped from `models:` leaves its results folder behind; the report (which the
    workflow gives the configured models) must not plot it, nor read a left-over HEALNet."""
    from healnet.report import cli as report

    cohort, _ = shared_cohort(tmp_path_factory)
    shared_run(tmp_path_factory, "snn")
    healnet_run = as_runs(shared_run(tmp_path_factory, "healnet"), tmp_path / "runs", ["healnet", "snn"])
    results = healnet_run / "results"
    attention_from: list[Path | None] = []
    monkeypatch.setattr(explain, "draw_attention_figures",
                        lambda models_dir, **kwargs: attention_from.append(models_dir))
    args = ["--cohort", "TINY", "--results-dir", str(results), "--omics-dir", str(cohort.omics_dir),
            "--models-dir", str(healnet_run / "models"), "--encoder", "planted",
            "--features-dir", str(cohort.features_dir),
            "--tiles-dir", str(tmp_path / "tiles"), "-o", str(tmp_path / "figures")]
    assert report.cli([*args, "--runs", "none/snn"]) == 0
    assert set(pd.read_csv(results / "logrank.csv")["model"]) == {"snn"}
    assert attention_from == [None]
    assert report.cli(args) == 0  # no --runs: every model with results
    assert set(pd.read_csv(results / "logrank.csv")["model"]) == {"healnet", "snn"}
    assert attention_from[-1] == healnet_run / "models" / "planted" / "healnet"
    # HEALNet on a second encoder's features: the panels name the encoder; the attention drawn is
    # that of the encoder given
    shutil.copytree(results / "planted" / "healnet", results / "other" / "healnet")
    assert report.cli(args) == 0
    drawn = set(pd.read_csv(results / "logrank.csv")["model"])
    assert drawn == {"healnet (planted)", "healnet (other)", "snn"}
    assert attention_from[-1] == healnet_run / "models" / "planted" / "healnet"


def test_failed_slides_lists_a_slide_whose_extraction_was_recorded_as_failed(tmp_path: Path) -> None:
    from healnet.report.figures import failed_slides
    from preprocessing.tiling.tiles import write_tiles

    grid = pd.DataFrame({"x": [0, 256], "y": [0, 0], "tissue_fraction": [1.0, 1.0]})
    reason = "more than 1.00% of 2 patches cannot be decoded; first at x=0, y=0"
    for stem in ("TCGA-AA-0001-01Z-00-DX1", "TCGA-AA-0002-01Z-00-DX1"):
        write_tiles(tmp_path / "tiles" / f"{stem}.parquet", grid, {"level": 0})
        store = tmp_path / "features" / f"{stem}.zarr"
        if stem.startswith("TCGA-AA-0002"):  # as extraction records it (on_slide_error: record)
            write_feature_store(store, np.zeros((0, 4)), np.zeros((0, 2)), failed=reason)
        else:
            write_feature_store(store, np.ones((2, 4)), grid[["x", "y"]].to_numpy())
    table = failed_slides(tmp_path / "tiles", tmp_path / "features")
    assert table.to_dict("records") == [{
        "slide": "TCGA-AA-0002-01Z-00-DX1", "patient": "TCGA-AA-0002", "status": "failed",
        "reason": "more than 1.00% of 2 patches cannot be decoded; first at x=0, y=0"}]
    assert failed_slides(tmp_path / "tiles").empty  # without the stores, tiling saw nothing wrong
    # a slide no longer in the slides folder is not listed, although its tiles file is still there
    assert failed_slides(tmp_path / "tiles", tmp_path / "features", {"TCGA-AA-0001-01Z-00-DX1"}).empty
    # a damaged tiles file is a failed slide with its reason, as in the omics step, not a crash
    (tmp_path / "tiles" / "TCGA-AA-0001-01Z-00-DX1.parquet").write_bytes(b"PAR1 cut short")
    table = failed_slides(tmp_path / "tiles", tmp_path / "features")
    assert list(table["status"]) == ["failed", "failed"]
    assert table["reason"].iloc[0].startswith("tiles file unreadable (")


def test_the_report_names_an_unreadable_predictions_file(tmp_path: Path) -> None:
    from healnet.report.figures import load_predictions

    (tmp_path / "none" / "snn").mkdir(parents=True)
    (tmp_path / "none" / "snn" / "predictions.parquet").write_bytes(b"PAR1 cut short")
    with raises_one_line_error(match=r"snn/predictions.parquet: cannot read predictions \(.*retrain",
                               source=tmp_path / "none" / "snn" / "predictions.parquet"):
        load_predictions(tmp_path, ["none/snn"])


def test_kaplan_meier_groups_hold_only_patients_the_model_scored(tmp_path: Path) -> None:
    """A patient without any modality the model reads got the training median as a stand-in risk;
    counted in the low-risk group it would bend that curve and the log-rank test."""
    from healnet.report.figures import plot_km_curves

    rng = np.random.default_rng(0)
    n = 30
    preds = pd.DataFrame({"model": "snn", "setting": "full", "risk": rng.normal(size=n),
                          "train_median_risk": 0.0, "time": rng.uniform(1, 50, n),
                          "event": rng.integers(0, 2, n), "imputed": np.arange(n) < 6})
    preds.loc[preds["imputed"], "risk"] = 0.0
    table = plot_km_curves(preds, tmp_path / "km.png").iloc[0]
    scored = preds[~preds["imputed"]]
    assert (table["n_high"], table["n_low"], table["n_unscored"]) == (
        int((scored["risk"] > 0).sum()), int((scored["risk"] <= 0).sum()), 6)


def test_the_attention_figure_draws_one_slide_per_chosen_patient_in_risk_order() -> None:
    """Panels arrive per slide in fold order; a patient with two slides in the first fold must not
    push the lowest-risk patient out of the figure."""
    def panel(patient: str, slide: str, n_patches: int) -> dict:
        return {"patient": patient, "slide": slide, "coords": np.zeros((n_patches, 2))}

    panels = [panel("A", "A1", 5), panel("A", "A2", 9), panel("B", "B1", 4), panel("C", "C1", 3),
              panel("D", "D1", 7)]
    wanted = {"A": "highest predicted risk", "D": "lowest predicted risk", "C": "highest predicted risk"}
    drawn = explain.one_panel_per_patient(panels, wanted, 3)
    assert [p["slide"] for p in drawn] == ["A2", "D1", "C1"]
    assert [p["slide"] for p in explain.one_panel_per_patient(panels, wanted, 2)] == ["A2", "D1"]


