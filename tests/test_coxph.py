"""The penalised Cox model (``coxph``) in the harness: it finds the planted risk, its baseline hazard
is Breslow's, its checkpoint scores as the fit did, and it never reads a held-out patient."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from factory import shared_cohort, shared_run, train

from healnet.data.checkpoints import load_checkpoint
from healnet.models.coxph import breslow

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_coxph_finds_the_planted_risk_in_every_setting(tmp_path_factory: pytest.TempPathFactory) -> None:
    out = shared_run(tmp_path_factory, "coxph")
    folds = pd.read_csv(out / "results" / "coxph" / "folds.csv").query("metric == 'c_index'")
    means = folds.groupby("setting")["value"].mean()
    assert set(means.index) == {"full", "omics_only", "wsi_only", "random_half"}  # read as multimodal
    assert means["full"] > 0.65, means  # the planted cohort's risk is linear in both modalities
    # the checkpoint holds the fit: reloaded, it gives the held-out risks the run scored
    model, ckpt = load_checkpoint(out / "models" / "coxph" / "fold0.pt")
    assert ckpt["model_spec"]["name"] == "coxph" and float(model.coef.abs().sum()) > 0
    assert np.isfinite(model.log_h0.numpy()).all() and (np.diff(model.log_h0.numpy()) >= 0).all()


def test_breslow_without_covariates_is_nelson_aalen() -> None:
    time = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 8.0])
    event = np.array([1, 1, 0, 1, 0, 1])
    expected = np.cumsum([1 / 6, 1 / 5, 1 / 3, 1 / 1])  # deaths / at risk at the death times 1, 2, 3, 8
    got = breslow(np.zeros(6), time, event, [1.0, 2.0, 3.0, 8.0, 10.0])
    np.testing.assert_allclose(got, [*expected, expected[-1]])
    # a higher linear predictor for the early deaths lowers the baseline: each death's risk set is larger
    assert breslow(np.array([2.0, 2, 0, 0, 0, 0]), time, event, [8.0])[0] < expected[-1]


def test_the_fit_never_reads_a_held_out_patient(tmp_path_factory: pytest.TempPathFactory,
                                                tmp_path: Path) -> None:
    """Shuffling the held-out patients' survival (and nothing else) leaves fold 0's fitted model
    exactly as it was: the PCA, the coefficients and the baseline hazard come from the training fold."""
    cohort, config = shared_cohort(tmp_path_factory)
    shuffled = tmp_path / "omics"
    shutil.copytree(cohort.omics_dir, shuffled)
    manifest = pd.read_parquet(shuffled / "manifest.parquet")
    splits = pd.read_parquet(shuffled / "splits.parquet")
    held = splits.query("fold == 0 and role == 'val'")["patient"]
    rows = manifest.index[manifest["patient"].isin(held)]
    order = np.random.default_rng(0).permutation(len(rows))
    manifest.loc[rows, ["time", "event"]] = manifest.loc[rows, ["time", "event"]].to_numpy()[order]
    manifest.to_parquet(shuffled / "manifest.parquet")
    states = []
    for name, data in (("original", cohort), ("shuffled", dataclasses.replace(cohort, omics_dir=shuffled))):
        assert train(data, config, "coxph", tmp_path / name, "--folds", "0") == 0
        states.append(torch.load(tmp_path / name / "models/coxph/fold0.pt", weights_only=True)["state_dict"])
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0, msg=key)


def test_a_cox_setting_retrains_only_coxph() -> None:
    """The workflow retrains a model when its training snapshot changes: the Cox settings are in the
    Cox model's snapshot only, and the learning settings it does not use are not in it."""
    from healnet.config import validate_config
    from healnet.settings import training_snapshot

    config = validate_config({"cohorts": {"C": {"demo": True}}})
    cox = training_snapshot(config, "C", "coxph")["training"]
    deep = training_snapshot(config, "C", "healnet")["training"]
    assert {"cox_penalty", "cox_components", "omic_max_features"} <= set(cox)
    assert not {"lr", "epochs", "ensemble", "modality_dropout"} & set(cox)
    assert not {"cox_penalty", "cox_components"} & set(deep) and "lr" in deep
