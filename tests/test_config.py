"""The config file is checked before anything runs, and errors name the offending key."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from healnet.config import load_config, validate_config
from preprocessing.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def default_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_default_config_is_valid_and_defaults_fill_missing_sections() -> None:
    cfg = load_config(REPO / "config.yaml")
    assert cfg["tiling"]["target_mpp"] == 0.5
    minimal = validate_config({"cohorts": {"X": {"demo": True}}})
    assert minimal["extract"]["encoder"] == "efficientnet_lite0"
    assert minimal["models"] == ["healnet", "snn", "abmil", "perceiver", "late_fusion"]


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda c: c["tiling"].update(patch_sise=256), "patch_sise"),
        (lambda c: c.update(trainig={}), "trainig"),
        (lambda c: c["tiling"].update(target_mpp="half"), "tiling.target_mpp"),
        (lambda c: c["cohorts"]["DEMO"].update(slide="x"), "slide"),
        (lambda c: c.update(models=["healnet", "resnet"]), "models.1"),
    ],
)
def test_bad_config_names_the_key(edit, named: str) -> None:
    cfg = copy.deepcopy(default_config())
    edit(cfg)
    with pytest.raises(InputError, match=named.replace(".", r"\.")):
        validate_config(cfg)


def test_snakemake_refuses_unknown_key_with_its_name(tmp_path: Path) -> None:
    cfg = default_config()
    cfg["extract"]["batchsize"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    snakemake = Path(sys.executable).parent / "snakemake"
    run = subprocess.run(
        [str(snakemake), "-n", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--configfile", str(path)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert run.returncode != 0
    assert "batchsize" in run.stdout + run.stderr
