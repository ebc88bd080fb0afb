"""``healnet report`` on a cohort whose HEALNet checkpoint was damaged after training: one line that
names the file and says how to recover, exit status 1."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from factory import as_runs, planted_cohort, train, write_config
from helpers import assert_one_line_error, run_healnet


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smallest cohort the report takes: 24 patients, 3 folds, HEALNet trained for one epoch."""
    root = tmp_path_factory.mktemp("report")
    cohort = planted_cohort(root, n_patients=24, n_folds=3, dim=8, patches=(4, 12))
    config = write_config(root / "config.yaml", {"epochs": 1})
    assert train(cohort, config, "healnet", root / "trained") == 0
    return as_runs(root / "trained", root, ["healnet"])


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_checkpoint_is_one_line_with_the_advice(trained: Path, tmp_path: Path, damage: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "cohort"
    shutil.copytree(trained, root)
    checkpoint = root / "models" / "planted" / "healnet" / "fold0.pt"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(b"not a checkpoint\n" if damage == "garbage" else data[: len(data) // 2])
    folders = {f"--{name}-dir": root / name for name in ("results", "omics", "models", "features", "tiles")}
    ran = run_healnet(capsys, "report", "--cohort", "TINY", *(str(x) for kv in folders.items() for x in kv),
                      "--encoder", "planted", "-o", root / "figures")
    assert_one_line_error(ran, "cannot read checkpoint (", "); delete it and rerun its fold",
                          command="report", source=checkpoint, status=1)
    assert checkpoint.exists()  # the report names the file; deleting it is the user's call
