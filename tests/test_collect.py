"""``healnet collect`` (healnet.training.collect, healnet.data.results): folds trained as separate jobs,
as the workflow trains them, join into the outputs of one all-fold run; a fold set that does not
belong together, or a damaged fold file, is one line and leaves the joined outputs alone."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from factory import shared_cohort, shared_run, train
from helpers import assert_one_line_error, run_healnet

from healnet.cli import main as healnet_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fold_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HEALNet's folds 0, 1 and 2 of the training tests' cohort, each trained as its own run into
    ``fold{k}`` of the folder returned."""
    data, config = shared_cohort(tmp_path_factory)
    root = tmp_path_factory.mktemp("folds")
    model_dir = root / "results" / "healnet"
    for k in (0, 1, 2):
        assert train(data, config, "healnet", root, "--folds", str(k), workers=None,
                     results=model_dir / f"fold{k}") == 0
    return model_dir


@pytest.fixture
def model_dir(fold_runs: Path, tmp_path: Path) -> Path:
    """A copy of the fold runs for one test to collect (and damage)."""
    return Path(shutil.copytree(fold_runs, tmp_path / "results" / "healnet"))


def collect(model_dir: Path, folds: str) -> int:
    return healnet_main(["collect", "--results-dir", str(model_dir), "--folds", folds])


def test_folds_trained_as_separate_runs_collect_into_the_all_fold_outputs(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The workflow trains each fold as its own job; joined, they equal one all-fold run."""
    whole = shared_run(tmp_path_factory, "healnet") / "results" / "healnet"
    assert collect(model_dir, "0,1,2") == 0
    assert pd.read_csv(model_dir / "folds.csv").equals(pd.read_csv(whole / "folds.csv"))
    predictions = pd.read_parquet(model_dir / "predictions.parquet")
    assert predictions.equals(pd.read_parquet(whole / "predictions.parquet"))
    log = json.loads((model_dir / "log.json").read_text())
    assert [f["fold"] for f in log["folds"]] == [0, 1, 2] and log["model"] == "healnet"


def test_a_fold_run_with_another_thread_count_or_device_is_joined(model_dir: Path) -> None:
    # another thread count or device changes only how fast a fold trains
    fold1 = model_dir / "fold1" / "log.json"
    log1 = json.loads(fold1.read_text())
    fold1.write_text(json.dumps({**log1, "run": {**log1["run"], "threads": 7, "device": "cuda"}}))
    assert collect(model_dir, "0,1,2") == 0


# ------------------------------------------------------------------------------------- bad inputs


def _rewrite(name: str, change: Callable[[str], str]) -> Callable[[Path], Path]:
    """Hand-edit ``fold1/<name>``; returns the file."""
    def damage(model_dir: Path) -> Path:
        path = model_dir / "fold1" / name
        path.write_text(change(path.read_text()))
        return path
    return damage


def _another_folds_results(model_dir: Path) -> None:
    shutil.copytree(model_dir / "fold0", model_dir / "fold3")  # fold 3's folder holds fold 0's results


def _log_edit(change: Callable[[dict], object]) -> Callable[[str], str]:
    """A change of ``log.json``'s content, as JSON text."""
    return lambda text: json.dumps(change(json.loads(text)))


def _another_learning_rate(log: dict) -> dict:
    return {**log, "training": {**log["training"], "lr": 0.5}}


def _a_value_that_is_not_a_number(text: str) -> str:
    from io import StringIO

    broken = pd.read_csv(StringIO(text)).astype({"value": object})
    broken.loc[0, "value"] = "x"
    return broken.to_csv(index=False)


OTHER_RUN = "fold1: another run than fold 0: different training settings; retrain"

# (damage, --folds, what the line says, whether it names the damaged file, a good collect before)
BAD_FOLDS = [
    # a fold folder holding another fold's results, or a missing fold: no output
    pytest.param(_another_folds_results, "0,3", ("fold3", "expected only fold 3"), False, False,
                 id="another-folds-results"),
    pytest.param(lambda _: None, "0,4", ("train fold 4 first",), False, False, id="fold-not-trained"),
    # a fold rerun by hand with another learning rate is not joined with the others
    pytest.param(_rewrite("log.json", _log_edit(_another_learning_rate)), "0,1,2", (OTHER_RUN,), False, True,
                 id="other-training-settings"),
    pytest.param(lambda _: None, "0,0,2", ("a fold is named twice",), False, True, id="fold-named-twice"),
    # hand-edited fold files: one line each, and the joined outputs of a good collect stay as they were
    pytest.param(_rewrite("folds.csv", _a_value_that_is_not_a_number), "0,1,2",
                 ("column 'value' holds 'x' (row 2), not a number",), True, True, id="value-not-a-number"),
    pytest.param(_rewrite("folds.csv", lambda text: text[:20]), "0,1,2", ("missing columns",), True, True,
                 id="folds-csv-cut-short"),
    pytest.param(_rewrite("log.json", lambda _: "[1, 2]"), "0,1,2", ("not a training log",), True, True,
                 id="log-not-an-object"),
    pytest.param(_rewrite("log.json", _log_edit(lambda log: {**log, "seconds": "abc"})), "0,1,2",
                 ("not a training log",), True, True, id="log-seconds-not-a-number"),
]


@pytest.mark.parametrize(("damage", "folds", "said", "names_file", "collected_before"), BAD_FOLDS)
def test_folds_that_do_not_join_are_a_one_line_error_and_change_no_output(
    model_dir: Path, capsys: pytest.CaptureFixture[str], damage: Callable[[Path], Path | None], folds: str,
    said: tuple[str, ...], names_file: bool, collected_before: bool,
) -> None:
    joined = None
    if collected_before:
        assert collect(model_dir, "0,1,2") == 0
        joined = (model_dir / "folds.csv").read_bytes()
    damaged = damage(model_dir)
    ran = run_healnet(capsys, "collect", "--results-dir", model_dir, "--folds", folds)
    assert_one_line_error(ran, *said, command="collect", status=1, source=damaged if names_file else None)
    if joined is None:
        assert not (model_dir / "folds.csv").exists()
    else:
        assert (model_dir / "folds.csv").read_bytes() == joined
