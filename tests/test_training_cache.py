"""Run settings of ``healnet train`` that change how fast a fold trains and no number
(healnet.training.cache, memory; healnet.data.resident): reader processes, the decoded-feature cache
and bags kept on the device; and a job ended by SIGTERM leaves no cache behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from factory import (
    Cohort,
    assert_same_outputs,
    count_store_reads,
    fold0_outputs,
    shared_cohort,
    train,
    train_args,
    write_config,
)
from helpers import REPO, assert_one_line_error, run_healnet

from healnet.training import memory

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Cohort, Path]:
    """The training tests' cohort (factory.training_cohort) and its default config."""
    return shared_cohort(tmp_path_factory)


def test_reader_count_leaves_the_numbers_unchanged(cohort: tuple[Cohort, Path], tmp_path: Path) -> None:
    # training.workers is a run setting that Snakemake does not track, so it must not change results
    data, _ = cohort
    outputs = []
    for workers in (0, 2):
        config = write_config(tmp_path / f"w{workers}.yaml", {"modality_dropout": 0.5, "workers": workers})
        output, log = fold0_outputs(data, config, tmp_path / f"w{workers}")
        outputs.append(output)
    assert log["run"]["workers"] == 2 and "workers" not in log["training"]
    assert_same_outputs(outputs)


def test_decoded_feature_cache_reads_each_store_once_and_changes_no_number(
    cohort: tuple[Cohort, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, _ = cohort
    reads = count_store_reads(monkeypatch)
    cache = tmp_path / "cache"
    outputs = []
    for name, extra, workers in (("plain", (), 0), ("cached", ("--feature-cache", str(cache)), 0),
                                 ("cached-readers", ("--feature-cache", str(cache)), 2)):
        reads.clear()
        config = write_config(tmp_path / f"{name}.yaml", {"modality_dropout": 0.5, "workers": workers,
                                                          "epochs": 3})
        output, log = fold0_outputs(data, config, tmp_path / name, *extra)
        outputs.append(output)
        if name == "plain":
            assert len(reads) > len(set(reads))  # every epoch decodes its stores again
        elif workers == 0:
            assert sorted(reads) == sorted(set(reads))  # each store decoded once
        assert log["run"]["feature_cache"] == (str(cache) if extra else None)
    assert_same_outputs(outputs)
    assert cache.is_dir() and not any(cache.iterdir())  # each run's private folder is removed


def test_a_feature_cache_folder_that_cannot_be_made_is_a_one_line_error(
    cohort: tuple[Cohort, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, _ = cohort
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = write_config(tmp_path / "bad.yaml", {"workers": 0})
    ran = run_healnet(capsys, *train_args(data, config, "healnet", tmp_path / "bad", "--folds", "0",
                                          "--feature-cache", str(blocker / "sub"), workers=None))
    assert_one_line_error(ran, "training.feature_cache: cannot make a folder in", command="train", status=1)


def test_a_job_ended_by_sigterm_removes_its_feature_cache_and_temporary_outputs(
    cohort: tuple[Cohort, Path], tmp_path: Path
) -> None:
    """SIGTERM is how a cluster ends a job at its time limit; the decoded-feature cache (about 1.8x the
    stores) must not stay behind, which Python's default handling of SIGTERM would leave."""
    data, _ = cohort
    config = write_config(tmp_path / "long.yaml", {"workers": 1, "epochs": 10_000})
    cache = tmp_path / "cache"
    args = train_args(data, config, "abmil", tmp_path, "--folds", "0", "--feature-cache", str(cache),
                      workers=None)
    job = subprocess.Popen([sys.executable, "-m", "healnet.cli", *args], stderr=subprocess.PIPE, text=True,
                           cwd=REPO)
    deadline = time.monotonic() + 120
    while not list(cache.glob("healnet-features-*/*")) and time.monotonic() < deadline:
        if job.poll() is not None:
            break
        time.sleep(0.2)
    assert list(cache.glob("healnet-features-*/*")), job.stderr.read() if job.poll() is not None else ""
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=60) == 128 + signal.SIGTERM
    assert list(cache.iterdir()) == []
    assert not list((tmp_path / "models").rglob("fold0.pt"))


def test_feature_cache_none_in_a_config_means_no_cache(
    cohort: tuple[Cohort, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, _ = cohort
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "none.yaml", {"workers": 0, "epochs": 1, "feature_cache": "none"})
    assert train(data, config, "healnet", tmp_path / "out", "--folds", "0", workers=None) == 0
    assert not (tmp_path / "none").exists()
    log = json.loads((tmp_path / "out" / "results" / "healnet" / "log.json").read_text())
    assert log["run"]["feature_cache"] is None  # recorded as the CLI's `--feature-cache none` is


def test_bags_kept_on_the_device_change_no_number_and_are_read_when_they_do_not_fit(
    cohort: tuple[Cohort, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data, _ = cohort
    outputs = []
    for name, setting, workers in (("read", "no", 0), ("kept", "yes", 0), ("kept-readers", "yes", 2),
                                   ("too-large", "yes", 0)):
        if name == "too-large":
            monkeypatch.setattr(memory, "free_memory", lambda device: 1000)
        config = write_config(tmp_path / f"{name}.yaml", {"modality_dropout": 0.5, "workers": workers,
                                                          "epochs": 3})
        caplog.clear()
        output, log = fold0_outputs(data, config, tmp_path / name, "--bags-on-device", setting)
        outputs.append(output)
        assert ("bags_on_device_seconds" in log["folds"][0]) == name.startswith("kept")
        assert ("read from the stores at every epoch instead" in caplog.text) == (name == "too-large")
    assert_same_outputs(outputs)


def test_an_ensemble_keeps_its_bags_on_the_device_once_for_all_members(
    cohort: tuple[Cohort, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, _ = cohort
    reads = count_store_reads(monkeypatch)
    counts = []
    for members in (1, 2):
        config = write_config(tmp_path / f"{members}.yaml", {"workers": 0, "epochs": 2, "ensemble": members})
        reads.clear()
        out = tmp_path / str(members)
        _, log = fold0_outputs(data, config, out, "--bags-on-device", "yes")
        assert "bags_on_device_seconds" in log["folds"][0]
        counts.append(len(reads))
    assert counts[0] == counts[1]  # a second member reads no store again
