"""The models learn: on a cohort whose survival follows a planted risk, ``healnet train`` lowers the
training loss and ranks held-out patients well above chance, though not better than the planted risk
itself; and the ``random_half`` missing-modality setting leaves each patient exactly one modality."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from factory import Cohort, planted_cohort, train, write_config

from healnet.evaluation.metrics import c_index
from healnet.training.scoring import setting_flags

MODELS = ("snn", "healnet")
EPOCHS = 10


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Cohort, Path]:
    """A 90-patient planted-signal cohort (3 folds) and the results folder of each model trained on it."""
    root = tmp_path_factory.mktemp("learning")
    cohort = planted_cohort(root, n_patients=90, n_folds=3, seed=1)
    config = write_config(root / "config.yaml", {"epochs": EPOCHS, "lr": 1e-3, "batch_size": 8,
                                                 "grad_accumulation": 1})
    for model in MODELS:
        status = train(cohort, config, model, root)
        assert status == 0, f"healnet train --model {model} exited {status}"
    return cohort, root / "results"


def held_out_c_index(results: Path) -> list[float]:
    """The model's c-index on each fold's held-out patients, all modalities given (``full``)."""
    folds = pd.read_csv(results / "folds.csv")
    full = folds[(folds["setting"] == "full") & (folds["metric"] == "c_index")].sort_values("fold")
    return full["value"].tolist()


def planted_c_index(cohort: Cohort) -> list[float]:
    """The planted risk's own c-index on each fold's held-out patients: what a perfect model reaches."""
    splits = pd.read_parquet(cohort.omics_dir / "splits.parquet")
    labels = cohort.manifest.set_index("patient")
    values = []
    for fold in range(cohort.n_folds):
        held_out = splits.loc[(splits["fold"] == fold) & (splits["role"] == "val"), "patient"]
        rows, risk = labels.loc[held_out], cohort.risk[held_out].to_numpy()
        values.append(c_index(rows["time"].to_numpy(), rows["event"].to_numpy(), risk))
    return values


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_training_loss_falls(trained: tuple[Cohort, Path], model: str) -> None:
    log = json.loads((trained[1] / model / "log.json").read_text())
    for fold in log["folds"]:
        losses = [epoch["train_loss"] for epoch in fold["epochs"] if "epoch" in epoch]
        assert len(losses) == EPOCHS and all(np.isfinite(losses))
        # the last three epochs, averaged against epoch noise, well under the first
        assert np.mean(losses[-3:]) < 0.9 * losses[0], f"{model} fold {fold.get('fold')}: losses {losses}"


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_held_out_c_index_is_above_chance_and_below_the_planted_risk(trained: tuple[Cohort, Path],
                                                                    model: str) -> None:
    cohort, results = trained
    learned, planted = np.mean(held_out_c_index(results / model)), np.mean(planted_c_index(cohort))
    assert planted > 0.75  # the cohort has a signal worth learning
    assert 0.6 < learned < planted, f"{model}: held-out c-index {learned:.3f}, planted risk's {planted:.3f}"


# ------------------------------------------------------------------------- missing-modality settings


def _flags(seed: tuple[int, ...] = (0, 7)) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """200 patients: both modalities, slides only, omics only and none, in a fixed mix; returns the
    flags they have and those ``random_half`` leaves them."""
    kind = np.arange(200) % 5  # 0, 1: both; 2: slides only; 3: omics only; 4: none
    has_wsi, has_omics = np.isin(kind, [0, 1, 2]), np.isin(kind, [0, 1, 3])
    wsi, omics = setting_flags("random_half", has_wsi, has_omics, seed)
    assert (has_wsi == np.isin(kind, [0, 1, 2])).all() and (has_omics == np.isin(kind, [0, 1, 3])).all(), \
        "setting_flags changed the caller's arrays"
    return has_wsi, has_omics, wsi, omics


def test_random_half_leaves_each_patient_with_both_modalities_exactly_one() -> None:
    has_wsi, has_omics, wsi, omics = _flags()
    both = has_wsi & has_omics
    assert (wsi ^ omics)[both].all()  # exactly one of the two
    assert 0.3 < wsi[both].mean() < 0.7  # and either one, about half the time
    assert (wsi == has_wsi)[~both].all() and (omics == has_omics)[~both].all()  # one or none: kept
    assert not (wsi & ~has_wsi).any() and not (omics & ~has_omics).any()  # nothing gained


def test_random_half_is_deterministic_for_a_seed() -> None:
    _, _, wsi, omics = _flags((0, 7))
    _, _, same_wsi, same_omics = _flags((0, 7))
    _, _, other_wsi, _ = _flags((1, 7))
    assert (wsi == same_wsi).all() and (omics == same_omics).all()
    assert (wsi != other_wsi).any()


@pytest.mark.parametrize(("setting", "keeps"), [("full", (True, True)), ("omics_only", (False, True)),
                                                ("wsi_only", (True, False))])
def test_other_settings_keep_or_drop_a_whole_modality(setting: str, keeps: tuple[bool, bool]) -> None:
    has_wsi, has_omics = np.array([True, True, False]), np.array([True, False, True])
    wsi, omics = setting_flags(setting, has_wsi, has_omics, (0,))
    assert (wsi == (has_wsi & keeps[0])).all() and (omics == (has_omics & keeps[1])).all()
