"""``healnet train`` (healnet.training: cv, fold, loop): cross-validation on the tiny training cohort,
its outputs, seeds, weight averaging, early stopping, the baselines in the same harness, training
without slides, and bad inputs as one-line errors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from factory import (
    NO_OMICS,
    NO_WSI,
    Cohort,
    damage_store,
    shared_cohort,
    shared_run,
    slide_stem,
    train,
    train_args,
    write_config,
)
from helpers import assert_one_line_error, run_healnet

from healnet.training import loop

N_PATIENTS, N_FOLDS = 24, 3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Cohort, Path]:
    """The training tests' cohort (factory.training_cohort) and its default config."""
    return shared_cohort(tmp_path_factory)


@pytest.fixture(scope="module")
def healnet_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_run(tmp_path_factory, "healnet")


def test_tiny_cross_validation_writes_every_output(healnet_run: Path) -> None:
    results, models = healnet_run / "results" / "healnet", healnet_run / "models" / "healnet"
    assert sorted(p.name for p in models.iterdir()) == ["fold0.pt", "fold1.pt", "fold2.pt"]
    folds = pd.read_csv(results / "folds.csv")
    assert {"model", "fold", "setting", "metric", "value", "n_patients", "n_events"} <= set(folds.columns)
    assert set(folds["setting"]) == {"full", "omics_only", "wsi_only", "random_half"}
    assert set(folds["metric"]) == {"c_index", "ipcw_c_index", "ibs", "td_auc", "ibs_kaplan_meier"}
    assert len(folds) == 3 * 4 * 5 and folds.groupby("fold")["n_patients"].first().sum() == N_PATIENTS
    c_index = folds.query("metric == 'c_index' and setting == 'full'")["value"]
    assert c_index.between(0, 1).all()
    # omics_only: the patients without omics (no modality left) are scored with the training median
    only = folds.query("metric == 'c_index' and setting == 'omics_only'")["n_imputed"].sum()
    assert only == len(NO_OMICS)
    preds = pd.read_parquet(results / "predictions.parquet")
    assert {"patient", "fold", "setting", "risk", "time", "event", "train_median_risk"} <= set(preds.columns)
    full = preds[preds["setting"] == "full"]
    assert sorted(full["patient"]) == sorted(f"TCGA-AA-{i:04d}" for i in range(N_PATIENTS))
    log = json.loads((results / "log.json").read_text())
    epochs = [[e for e in f["epochs"] if "epoch" in e] for f in log["folds"]]
    assert len(epochs) == 3 and all(len(e) == 3 for e in epochs)
    assert all(np.isfinite(e["train_loss"]) for f in epochs for e in f)


def test_same_seed_same_c_index(cohort: tuple[Cohort, Path], tmp_path: Path) -> None:
    data, _ = cohort
    values, losses = [], []
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        # patch sampling (bags up to 39 patches, cap 16) and modality dropout both draw random numbers
        config = write_config(tmp_path / f"{run}.yaml", {"modality_dropout": 0.5, "seed": seed})
        out = tmp_path / run
        assert train(data, config, "perceiver", out, "--folds", "0", workers=None) == 0
        folds = pd.read_csv(out / "results" / "perceiver" / "folds.csv")
        values.append(folds.query("setting == 'full'")["value"].round(4).tolist())
        log = json.loads((out / "results" / "perceiver" / "log.json").read_text())
        losses.append([e["train_loss"] for e in log["folds"][0]["epochs"]])
    assert values[0] == values[1] and losses[0] == losses[1]
    assert losses[0] != losses[2]  # another seed really changes the run


def test_weight_averaging_keeps_the_mean_of_the_last_epochs_weights(
    cohort: tuple[Cohort, Path], tmp_path: Path
) -> None:
    # the first epochs of a longer run are those of a shorter one (seeded per epoch), so the weights
    # averaged over epochs 2-3 of a 3-epoch run are the mean of a 2-epoch and a 3-epoch run's weights
    data, _ = cohort

    def fold0(name: str, **settings: object) -> tuple[dict[str, torch.Tensor], dict]:
        config = write_config(tmp_path / f"{name}.yaml", {"modality_dropout": 0.5, **settings})
        out = tmp_path / name
        assert train(data, config, "healnet", out, "--folds", "0", workers=None) == 0
        state = torch.load(out / "models" / "healnet" / "fold0.pt", weights_only=True)["state_dict"]
        return state, json.loads((out / "results" / "healnet" / "log.json").read_text())["folds"][0]

    two, _ = fold0("two", epochs=2, average_last_epochs=0)
    three, _ = fold0("three", epochs=3, average_last_epochs=0)
    averaged, log = fold0("averaged", epochs=3, average_last_epochs=2)
    assert any(not torch.equal(two[k], three[k]) for k in two)
    for k in averaged:
        torch.testing.assert_close(averaged[k], (two[k] + three[k]) / 2)
    assert log["epochs"][-1] == {"averaged_epochs": 2}
    # more epochs asked for than trained: every epoch is averaged
    _, log = fold0("all", epochs=3, average_last_epochs=50)
    assert log["epochs"][-1] == {"averaged_epochs": 3}
    # with early stopping the best epoch is kept and nothing is averaged
    _, log = fold0("stopped", epochs=3, average_last_epochs=2, early_stopping=True, patience=9)
    assert "restored_epoch" in log["epochs"][-1] and not any("averaged_epochs" in e for e in log["epochs"])


@pytest.mark.parametrize("model", ["snn", "abmil", "late_fusion"])
def test_baselines_in_the_same_harness(cohort: tuple[Cohort, Path], tmp_path: Path, model: str) -> None:
    data, config = cohort
    assert train(data, config, model, tmp_path, "--folds", "0,2", workers=None) == 0
    folds = pd.read_csv(tmp_path / "results" / model / "folds.csv")
    settings = {"full", "omics_only", "wsi_only", "random_half"} if model == "late_fusion" else {"full"}
    assert set(folds["setting"]) == settings and sorted(folds["fold"].unique()) == [0, 2]
    full = folds.query("setting == 'full' and metric == 'c_index'")
    # unimodal models score patients lacking their modality with the training-median risk
    expected = {"snn": NO_OMICS, "abmil": NO_WSI, "late_fusion": set()}[model]
    folds_of = {p: int(p[-4:]) % N_FOLDS for p in expected}
    assert full["n_imputed"].sum() == sum(f in (0, 2) for f in folds_of.values())
    preds = pd.read_parquet(tmp_path / "results" / model / "predictions.parquet").query("setting == 'full'")
    imputed = preds[preds["patient"].isin(expected)]
    np.testing.assert_allclose(imputed["risk"], imputed["train_median_risk"])


def test_early_stopping_uses_an_inner_split_of_the_training_fold(
    cohort: tuple[Cohort, Path], tmp_path: Path
) -> None:
    data, _ = cohort
    config = write_config(tmp_path / "config.yaml",
                          {"early_stopping": True, "patience": 1, "epochs": 4, "inner_val_fraction": 0.3})
    assert train(data, config, "snn", tmp_path, "--folds", "1", workers=None) == 0
    fold = json.loads((tmp_path / "results" / "snn" / "log.json").read_text())["folds"][0]
    n_train_fold = N_PATIENTS - N_PATIENTS // N_FOLDS - sum(int(p[-4:]) % N_FOLDS != 1 for p in NO_OMICS)
    assert fold["n_train"] + fold["n_inner_val"] == n_train_fold and fold["n_inner_val"] >= 5
    assert all("inner_val_c_index" in e for e in fold["epochs"])
    assert "restored_epoch" in fold["epochs"][-1]


def test_early_stopping_without_a_comparable_pair_keeps_the_epoch_with_the_lowest_validation_loss() -> None:
    """A small inner split may hold no death, or none before another patient's time: its c-index is
    undefined at every epoch, so epochs are ranked by the validation NLL instead of keeping epoch 0."""
    from healnet.config import validate_config
    from healnet.data.bags import BagDataset
    from healnet.evaluation.metrics import c_index
    from healnet.models.baselines import SNN
    from healnet.settings import settings_from_config

    with pytest.raises(ValueError):  # no comparable pair: the c-index is undefined
        c_index(np.array([1.0, 2.0]), np.array([0, 1]), np.array([0.3, 0.1]))
    rng = np.random.default_rng(0)
    n, n_train = 40, 32
    x = rng.normal(size=(n, 5)).astype(np.float32)
    times = np.exp(-x[:, 0]) * 20
    events = np.r_[(rng.random(n_train) < 0.6).astype(int), np.zeros(n - n_train, int)]  # censored split
    bins = np.digitize(times, np.quantile(times, [0.25, 0.5, 0.75]))
    dataset = BagDataset(x, np.ones(n, bool), [[] for _ in range(n)], bins, events, times, read_wsi=False)
    training = {"lr": 3e-3, "weight_decay": 0.0, "batch_size": 8, "grad_accumulation": 1, "alpha": 0.4,
                "l1_omics": 0.0, "epochs": 12, "patience": 12}
    settings = settings_from_config(validate_config({"cohorts": {"X": {"demo": True}}, "training": training}))
    torch.manual_seed(0)
    snn = SNN(n_omics=5, n_bins=4, hidden=settings.training.baseline_hidden,
              dropout=settings.training.baseline_dropout)
    history = loop.train_model(snn, dataset, np.arange(n_train), np.arange(n_train, n),
                               settings.training, torch.device("cpu"), 0, 0, None)
    epochs = [h for h in history if "epoch" in h]
    assert all(np.isnan(h["inner_val_c_index"]) for h in epochs)
    losses = [h["inner_val_nll"] for h in epochs]
    best = int(np.argmin(losses))
    assert history[-1] == {"restored_epoch": best, "inner_val_nll": losses[best]} and best > 0


def test_without_feature_stores(
    cohort: tuple[Cohort, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, config = cohort
    empty = tmp_path / "no_features"
    empty.mkdir()
    without = replace(data, features_dir=empty)
    ran = run_healnet(capsys, *train_args(without, config, "abmil", tmp_path, workers=None))
    assert_one_line_error(ran, "needs WSI features", command="train", status=1)
    assert train(without, config, "healnet", tmp_path, "--folds", "0", workers=None) == 0
    log = json.loads((tmp_path / "results" / "healnet" / "log.json").read_text())
    assert any("trained on omics alone" in note for note in log["notes"])
    folds = pd.read_csv(tmp_path / "results" / "healnet" / "folds.csv")
    assert set(folds["setting"]) == {"full"}


# ------------------------------------------------------------------------------------- bad inputs

REEXTRACT = "delete the store and rerun extraction"


def _no_omics_folder(data: Cohort, tmp_path: Path) -> Cohort:
    return replace(data, omics_dir=tmp_path / "nowhere")


def _one_damaged_store(how: str) -> Callable[[Cohort, Path], Cohort]:
    """A features folder holding only a copy of the cohort's first store, damaged as ``how``."""
    def make(data: Cohort, tmp_path: Path) -> Cohort:
        store = sorted(data.features_dir.iterdir())[0]
        broken = tmp_path / "features"
        shutil.copytree(store, broken / store.name)
        damage_store(broken / store.name, how)
        return replace(data, features_dir=broken)
    return make


def _an_infinite_omic_value(data: Cohort, tmp_path: Path) -> Cohort:
    # healnet omics refuses infinite values; a table edited by hand would give NaN risks
    edited = tmp_path / "omics_edited"
    shutil.copytree(data.omics_dir, edited)
    table = pd.read_parquet(edited / "features.parquet")
    table.iloc[0, 1] = np.inf
    table.to_parquet(edited / "features.parquet")
    return replace(data, omics_dir=edited)


FIRST_STORE = f"{slide_stem('TCGA-AA-0000', 0)}.zarr"  # the first of the sorted stores

BAD_INPUTS = [
    pytest.param(_no_omics_folder, "snn", (), ("omics folder does not exist",), id="no-omics-folder"),
    pytest.param(lambda data, _: data, "snn", ("--folds", "7"), ("fold(s) [7] not in splits.parquet",),
                 id="unknown-fold"),
    pytest.param(_one_damaged_store("incomplete"), "abmil", (),
                 (FIRST_STORE, "not marked complete", REEXTRACT), id="store-not-complete"),
    # a chunk file gone (a partial copy): zarr would read zeros
    pytest.param(_one_damaged_store("missing_chunk"), "abmil", (),
                 (FIRST_STORE, "1 of 1 feature chunks are missing"), id="store-chunk-missing"),
    # metadata that is no longer JSON (a half-copied store) gets the same advice
    pytest.param(_one_damaged_store("bad_metadata"), "abmil", (),
                 (FIRST_STORE, "not a readable feature store", REEXTRACT), id="store-metadata-not-json"),
    pytest.param(_an_infinite_omic_value, "snn", (), ("features.parquet: 1 infinite value(s), first",),
                 id="infinite-omic-value"),
]


@pytest.mark.parametrize(("make", "model", "extra", "said"), BAD_INPUTS)
def test_bad_inputs_are_one_line_errors(
    cohort: tuple[Cohort, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    make: Callable[[Cohort, Path], Cohort], model: str, extra: tuple[str, ...], said: tuple[str, ...],
) -> None:
    data, config = cohort
    bad = make(data, tmp_path)
    ran = run_healnet(capsys, *train_args(bad, config, model, tmp_path, *extra, workers=None))
    assert_one_line_error(ran, *said, command="train", status=1)
