"""A killed fold (healnet.training.resume, loop, ensembles): it resumes where it saved with the numbers
an uninterrupted run gives, a seed ensemble loses only its unfinished member, and the temporaries a
killed save left are removed."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from factory import Cohort, assert_same_outputs, fold0_outputs, shared_cohort, train, write_config

from healnet.data.checkpoints import load_checkpoint
from healnet.training import loop

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Cohort, Path]:
    """The training tests' cohort (factory.training_cohort) and its default config."""
    return shared_cohort(tmp_path_factory)


class Killed(Exception):
    """Stands in for a job killed mid-epoch (a cluster time limit, a pre-empted GPU)."""


def count_training_steps(monkeypatch: pytest.MonkeyPatch) -> dict[str, int | None]:
    """Count the training steps (loss evaluations) from now on in ``["n"]``; the step numbered
    ``["kill_at"]`` raises :class:`Killed`, as a job killed in the middle of an epoch."""
    steps: dict[str, int | None] = {"n": 0, "kill_at": None}
    loss_fn = loop.nll_survival_loss

    def counted_loss(*args: object, **kwargs: object) -> torch.Tensor:
        steps["n"] += 1
        if steps["n"] == steps["kill_at"]:
            raise Killed
        return loss_fn(*args, **kwargs)

    monkeypatch.setattr(loop, "nll_survival_loss", counted_loss)
    return steps


def test_a_fold_removes_the_temporaries_killed_saves_left(
    cohort: tuple[Cohort, Path], tmp_path: Path
) -> None:
    """A job killed while saving leaves a hidden temporary state file (as large as the model); the
    fold's next run deletes its own, and leaves another fold's and a live writer's alone."""
    data, config = cohort
    models = tmp_path / "models" / "snn"
    models.mkdir(parents=True)
    dead = subprocess.Popen(["true"])  # a finished child: no process has its pid now
    dead.wait()
    names = {
        f".fold0.pt.tmp-{dead.pid}-aa": False,
        f".unfinished-fold0.pt.tmp-{dead.pid}-bb": False,
        f".unfinished-fold0-member1.pt.tmp-{dead.pid}-cc": False,
        f".unfinished-fold1.pt.tmp-{dead.pid}-dd": True,  # fold 1's, for fold 1's job to clear
        f".unfinished-fold0.pt.tmp-{os.getpid()}-ee": True,  # its writer is alive
    }
    for name in names:
        (models / name).write_bytes(b"half a state")
    assert train(data, config, "snn", tmp_path, "--folds", "0", workers=None) == 0
    assert {name: (models / name).exists() for name in names} == names
    assert (models / "fold0.pt").exists()


@pytest.mark.parametrize("early_stopping", [False, True])
def test_a_killed_fold_resumes_where_it_saved_and_gives_the_same_numbers(
    cohort: tuple[Cohort, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, early_stopping: bool
) -> None:
    data, _ = cohort
    # 4 epochs of 4 steps (fold 0 trains 16 patients, 4 per step); patience 9 so that none stops early
    # killed while the last 3 epochs' weights are being averaged: the partial average must be kept
    settings = {"epochs": 4, "modality_dropout": 0.5, "early_stopping": early_stopping, "patience": 9,
                "save_state_minutes": 0, "workers": 0, "average_last_epochs": 3}
    config = write_config(tmp_path / "c.yaml", settings)
    steps = count_training_steps(monkeypatch)

    def run(name: str, config: Path = config) -> tuple[pd.DataFrame, pd.DataFrame, dict, dict]:
        out = tmp_path / name
        assert train(data, config, "healnet", out, "--folds", "0", workers=None) == 0
        results = out / "results" / "healnet"
        state = torch.load(out / "models" / "healnet" / "fold0.pt", weights_only=True)["state_dict"]
        return (pd.read_csv(results / "folds.csv"), pd.read_parquet(results / "predictions.parquet"),
                json.loads((results / "log.json").read_text())["folds"][0], state)

    whole = run("whole")
    per_epoch = steps["n"] // 4
    assert not (tmp_path / "whole" / "models" / "healnet" / "unfinished-fold0.pt").exists()

    steps.update(n=0, kill_at=2 * per_epoch + 2)  # killed in the third epoch
    with pytest.raises(Killed):
        run("killed")
    models = tmp_path / "killed" / "models" / "healnet"
    assert sorted(p.name for p in models.iterdir()) == ["unfinished-fold0.pt"]

    steps.update(n=0, kill_at=None)
    resumed = run("killed")
    assert steps["n"] == 2 * per_epoch  # only the last two epochs were trained again
    flags = [e.get("resumed", False) for e in resumed[2]["epochs"] if "epoch" in e]
    assert flags == [False, False, True, False]
    assert sorted(p.name for p in models.iterdir()) == ["fold0.pt"]
    pd.testing.assert_frame_equal(resumed[0], whole[0])
    pd.testing.assert_frame_equal(resumed[1], whole[1])
    losses = [[e.get("train_loss") for e in r[2]["epochs"]] for r in (whole, resumed)]
    assert losses[0] == losses[1]
    assert all(torch.equal(whole[3][k], resumed[3][k]) for k in whole[3])

    # state saved under other settings is not resumed from: the run starts again
    steps.update(n=0, kill_at=2 * per_epoch + 2)
    with pytest.raises(Killed):
        run("changed")
    steps.update(n=0, kill_at=None)
    other = write_config(tmp_path / "other.yaml", {**settings, "lr": 2e-3})
    changed = run("changed", other)
    assert steps["n"] == 4 * per_epoch and not any(e.get("resumed") for e in changed[2]["epochs"])


def test_a_seed_ensemble_fold_keeps_every_member_and_a_kill_loses_only_the_unfinished_one(
    cohort: tuple[Cohort, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, _ = cohort
    settings = {"epochs": 3, "modality_dropout": 0.5, "save_state_minutes": 0, "workers": 0}
    steps = count_training_steps(monkeypatch)

    def run(name: str, members: int, seed: int = 0) -> tuple[tuple[pd.DataFrame, pd.DataFrame, list], Path]:
        config = write_config(tmp_path / f"{members}-{seed}.yaml", {**settings, "ensemble": members,
                                                                     "seed": seed})
        output, _ = fold0_outputs(data, config, tmp_path / name)
        return output, tmp_path / name / "models" / "healnet" / "fold0.pt"

    singles = [run(f"seed{seed}", 1, seed) for seed in (0, 1)]
    per_member = steps["n"] // 2
    steps["n"] = 0
    whole, whole_path = run("whole", 2)
    assert steps["n"] == 2 * per_member
    model, ckpt = load_checkpoint(whole_path)
    assert ckpt["model_spec"]["members"] == 2 and len(model.members) == 2
    # member i is the model that a single run with training.seed + i trains; the ensemble's risk is
    # the members' mean risk
    state = ckpt["state_dict"]
    for member, (_, path) in enumerate(singles):
        single = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.equal(state[f"members.{member}.{k}"], v) for k, v in single.items())
    risks = [out[1].query("setting == 'full'")["risk"].to_numpy() for out, _ in singles]
    assert not np.allclose(risks[0], risks[1])
    full = whole[1].query("setting == 'full'")["risk"].to_numpy()
    np.testing.assert_allclose(full, np.mean(risks, axis=0), atol=1e-5)
    log = json.loads((tmp_path / "whole" / "results" / "healnet" / "log.json").read_text())
    assert [e["member"] for e in log["folds"][0]["epochs"] if "epoch" in e] == [0, 0, 0, 1, 1, 1]

    # killed while member 1 trains: the rerun trains only what member 1 had left, same numbers
    steps.update(n=0, kill_at=per_member + per_member // 3 + 1)  # in member 1's second epoch
    with pytest.raises(Killed):
        run("killed", 2)
    models = tmp_path / "killed" / "models" / "healnet"
    assert sorted(p.name for p in models.iterdir()) == ["unfinished-fold0-member1.pt", "unfinished-fold0.pt"]
    steps.update(n=0, kill_at=None)
    resumed, _ = run("killed", 2)
    assert steps["n"] == per_member - per_member // 3
    assert sorted(p.name for p in models.iterdir()) == ["fold0.pt"]
    assert_same_outputs([whole, resumed])
    # rerun with a smaller ensemble: the dropped member's saved state does not stay behind
    steps.update(n=0, kill_at=per_member + per_member // 3 + 1)
    with pytest.raises(Killed):
        run("shrunk", 2)
    steps.update(n=0, kill_at=None)
    run("shrunk", 1)
    assert sorted(p.name for p in (tmp_path / "shrunk" / "models" / "healnet").iterdir()) == ["fold0.pt"]
