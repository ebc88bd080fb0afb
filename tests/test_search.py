"""Nested cross-validated model selection (``training.search``): chosen on the training patients only,
the same for a seed whether ``healnet train`` searches or ``healnet search`` jobs did, written to the
fold's log and shown in the summary."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from factory import TEST_DEVICE, Cohort, as_runs, shared_cohort, train, write_config
from helpers import raises_one_line_error

from healnet.cli import main
from healnet.evaluation import summary as evaluate
from healnet.settings import load_settings
from healnet.training.search import candidates, read_scores, with_choice

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEARCH = {"search": {"lr": [1e-4, 3e-3], "baseline_dropout": [0.0, 0.5]}, "search_folds": 2, "epochs": 2,
          "ensemble": 2}


def search_log(out: Path) -> dict:
    return json.loads((out / "results" / "snn" / "log.json").read_text())["folds"][0]["search"]


def search_jobs_then_train(cohort: Cohort, config: Path, out: Path) -> int:
    """The workflow's way: one ``healnet search`` per candidate on fold 0, then ``healnet train``
    reading their scores."""
    for i in range(4):
        assert main(["search", "--config", str(config), "--cohort", "TINY", "--model", "snn",
                     "--omics-dir", str(cohort.omics_dir), "--features-dir", str(cohort.features_dir),
                     "--models-dir", str(out / "models" / "snn"), "--device", TEST_DEVICE, "--threads", "1",
                     "--workers", "0", "--fold", "0", "--setting", str(i),
                     "-o", str(out / "search" / "fold0" / f"setting{i}.json")]) == 0
    return train(cohort, config, "snn", out, "--folds", "0", "--search-dir", str(out / "search"))


def test_the_choice_reads_no_held_out_patient_and_is_the_same_for_a_seed(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Shuffling fold 0's held-out survival leaves every inner score and the choice as they were; a
    second run with the same seed, its candidates scored by separate ``healnet search`` jobs as the
    workflow runs them, chooses the same; the chosen settings are those the fold trained with; scores
    made for another search are refused."""
    cohort, _ = shared_cohort(tmp_path_factory)
    config = write_config(tmp_path / "config.yaml", SEARCH)
    shuffled = tmp_path / "omics"
    shutil.copytree(cohort.omics_dir, shuffled)
    manifest = pd.read_parquet(shuffled / "manifest.parquet")
    held = pd.read_parquet(shuffled / "splits.parquet").query("fold == 0 and role == 'val'")["patient"]
    rows = manifest.index[manifest["patient"].isin(held)]
    manifest.loc[rows, ["time", "event"]] = manifest.loc[rows, ["time", "event"]].to_numpy()[::-1]
    manifest.to_parquet(shuffled / "manifest.parquet")
    logs = {}
    shuffled_cohort = dataclasses.replace(cohort, omics_dir=shuffled)
    for name, data in (("a", cohort), ("shuffled", shuffled_cohort)):
        assert train(data, config, "snn", tmp_path / name, "--folds", "0") == 0
        logs[name] = search_log(tmp_path / name)
    assert search_jobs_then_train(cohort, config, tmp_path / "b") == 0
    logs["b"] = search_log(tmp_path / "b")
    assert logs["a"] == logs["b"] == logs["shuffled"]
    c = {n: pd.read_csv(tmp_path / n / "results/snn/folds.csv").query("metric == 'c_index'")["value"].iloc[0]
         for n in ("a", "shuffled")}
    assert c["a"] != c["shuffled"]  # the shuffle did change what the held-out patients are scored on
    assert len(logs["a"]["candidates"]) == 4 and logs["a"]["inner_folds"] == 2
    assert all(len(c["inner_c_index"]) == 2 for c in logs["a"]["candidates"])
    chosen = logs["a"]["chosen"]
    best = max(c["mean"] for c in logs["a"]["candidates"])
    assert next(c["mean"] for c in logs["a"]["candidates"] if c["setting"] == chosen) == best
    trained_with = json.loads((tmp_path / "a/results/snn/log.json").read_text())["training"]
    assert trained_with["search"] == SEARCH["search"]  # the run's settings; the fold's choice is its own
    for name in ("a", "b"):  # the inner fits leave nothing behind
        assert not (tmp_path / name / "models/snn/search-fold0").exists()
    assert "saved with other settings" not in caplog.text  # no fit meets another fit's saved state
    # the summary lists the choice per run and fold
    runs = as_runs(tmp_path / "a", tmp_path / "runs", ["snn"])
    out = runs / "results" / "summary.csv"
    assert evaluate.cli(["--cohort", "TINY", "--results-dir", str(runs / "results"), "-o", str(out)]) == 0
    text = ", ".join(f"{k}={v}" for k, v in chosen.items())
    assert f"| snn | none | 0 | {text} | {best:.3f} |" in out.with_suffix(".md").read_text()
    # scores left from another search: its setting 1 (the first with lr 0.003) is another candidate now
    other = load_settings(write_config(tmp_path / "other.yaml", {
        **SEARCH, "search": {"lr": [1e-4, 1e-2], "baseline_dropout": [0.0, 0.5]}}))
    stale = tmp_path / "b/search/fold0/setting1.json"
    with raises_one_line_error(match="made for fold 0, setting", source=stale):
        read_scores(tmp_path / "b/search/fold0", 0, other)
    (tmp_path / "b/search/fold0/setting3.json").unlink()  # train reads the jobs' scores: one missing fails it
    scores = str(tmp_path / "b/search")
    assert train(cohort, config, "snn", tmp_path / "c", "--folds", "0", "--search-dir", scores) == 1


def test_search_values_are_typed_and_names_checked(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path / "c.yaml"))
    assert candidates({"lr": [1, 2], "epochs": [3, 4]}) == [
        {"lr": 1, "epochs": 3}, {"lr": 1, "epochs": 4}, {"lr": 2, "epochs": 3}, {"lr": 2, "epochs": 4}]
    chosen = with_choice(settings, {"lr": "1e-4", "epochs": 7.0, "latent_dim": 16})
    assert (chosen.training.lr, chosen.training.epochs, chosen.healnet.latent_dim) == (1e-4, 7, 16)
    assert isinstance(chosen.training.epochs, int) and np.isclose(settings.training.lr, 1e-3)
    for bad, why in (({"seed": [1]}, "cannot search seed"), ({"width": [1]}, "cannot search width"),
                     ({"epochs": [2.5]}, "not a whole number"), ({"lr": ["fast"]}, "not a number")):
        with raises_one_line_error(match=why, source="training.search"):
            with_choice(settings, {k: v[0] for k, v in bad.items()})
