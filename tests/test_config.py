"""The config file is checked before anything runs, and errors name the offending key."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from helpers import raises_one_line_error
from workflow_runner import snakemake

from healnet.config import load_config, validate_config

REPO = Path(__file__).resolve().parents[1]


def default_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_default_config_is_valid_and_defaults_fill_missing_sections() -> None:
    cfg = load_config(REPO / "config.yaml")
    assert cfg["tiling"]["target_mpp"] is None  # each encoder's own resolution
    minimal = validate_config({"cohorts": {"X": {"demo": True}}})
    assert minimal["extract"]["encoder"] == "efficientnet_lite0" and minimal["extract"]["encoders"] is None
    assert minimal["models"] == ["healnet", "snn", "abmil", "perceiver", "late_fusion", "coxph"]
    assert minimal["extract"]["workers"] == minimal["training"]["workers"] == "auto"
    three = validate_config({"cohorts": {"X": {"demo": True}}, "extract": {"workers": 3}})
    assert three["extract"]["workers"] == 3


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda c: c["tiling"].update(patch_sise=256), "patch_sise"),
        (lambda c: c.update(trainig={}), "trainig"),
        (lambda c: c["tiling"].update(target_mpp="half"), "tiling.target_mpp"),
        (lambda c: c["cohorts"]["DEMO"].update(slide="x"), "slide"),
        (lambda c: c.update(models=["healnet", "resnet"]), "models.1"),
        (lambda c: c["extract"].update(workers="many"), "extract.workers"),
        (lambda c: c["extract"].update(workers=-1), "extract.workers"),
        (lambda c: c["training"].update(workers="all"), "training.workers"),
        # NaN passes every schema bound; it would train to NaN risks and exit 0
        (lambda c: c["training"].update(alpha=float("nan")), "training.alpha: nan is not a finite number"),
        (lambda c: c["training"].update(lr=float("inf")), "training.lr: inf is not a finite number"),
    ],
)
def test_bad_config_names_the_key(edit, named: str) -> None:
    cfg = copy.deepcopy(default_config())
    edit(cfg)
    with raises_one_line_error(match=named.replace(".", r"\.")):
        validate_config(cfg)


def test_snakemake_refuses_unknown_key_with_its_name(tmp_path: Path) -> None:
    cfg = default_config()
    cfg["extract"]["batchsize"] = 3
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    run = snakemake(tmp_path, "-n", timeout=120)
    assert run.returncode != 0
    assert "batchsize" in run.stdout + run.stderr
    del cfg["extract"]["batchsize"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg).replace("lr: 0.0002", "lr: .nan"))
    run = snakemake(tmp_path, "-n", timeout=120)
    assert run.returncode != 0
    assert "training.lr: nan is not a finite number" in run.stdout + run.stderr


def test_a_yaml_syntax_error_is_one_line_with_its_place(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  epochs: 2\n   ensemble: 1\n")
    with raises_one_line_error() as err:
        load_config(bad)
    assert str(err.value).count("\n") == 0
    assert "bad.yaml" in str(err.value) and "(line 3, column 12)" in str(err.value)


def test_small_numbers_survive_the_json_snapshot_that_training_reads(tmp_path: Path) -> None:
    """The workflow hands settings to each training job as JSON, where 0.00001 is spelled 1e-05."""
    cfg = validate_config(default_config())
    cfg["training"]["weight_decay"] = 0.00001
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert '"weight_decay": 1e-05' in path.read_text()
    assert load_config(path)["training"]["weight_decay"] == 1e-05


def test_exponent_without_a_dot_is_a_number(tmp_path: Path) -> None:
    text = (REPO / "config.yaml").read_text().replace("lr: 0.0002 ", "lr: 2e-4 ")
    assert "lr: 2e-4 " in text
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert load_config(path)["training"]["lr"] == 2e-4
    assert yaml.safe_load("lr: 2e-4") == {"lr": "2e-4"}  # PyYAML's own safe loader is left as it was
    with raises_one_line_error(match=r"training\.lr"):
        validate_config({"cohorts": {"X": {"demo": True}}, "training": {"lr": "2e-4x"}})


def test_whole_numbers_written_as_floats_become_integers() -> None:
    """JSON Schema passes 100.0 as an integer; training needs an int (range, batch sizes)."""
    cfg = validate_config({"cohorts": {"X": {"demo": True}},
                           "training": {"epochs": 100.0, "batch_size": "8e0", "max_patches_train": 4.096e3}})
    values = [cfg["training"][k] for k in ("epochs", "batch_size", "max_patches_train")]
    assert values == [100, 8, 4096] and all(type(v) is int for v in values)
    assert type(cfg["training"]["lr"]) is float  # a number setting stays a float
    with raises_one_line_error(match=r"training\.epochs"):
        validate_config({"cohorts": {"X": {"demo": True}}, "training": {"epochs": 2.5}})


def test_snakemake_accepts_an_exponent_without_a_dot(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    text = (REPO / "config.yaml").read_text()
    path.write_text(text.replace("weight_decay: 0.0001\n", "weight_decay: 1e-5\n"))
    assert "weight_decay: 1e-5\n" in path.read_text()
    run = snakemake(tmp_path, "-n", "--config", "healnet={attn_dropout: 5e-2}", timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]


def test_cohort_names_may_be_tcga_project_ids() -> None:
    assert "TCGA-LUAD" in validate_config({"cohorts": {"TCGA-LUAD": {"demo": True}}})["cohorts"]
    for bad in ("-LUAD", "LUAD/2", "LU AD"):
        with raises_one_line_error(match="cohorts"):
            validate_config({"cohorts": {bad: {"demo": True}}})


def test_typed_settings_cover_the_schema_and_hold_no_defaults_of_their_own() -> None:
    """The schema's defaults are the only ones: every training and healnet key is a field of exactly
    one settings class, and no field has a default."""
    import dataclasses

    from healnet.config import SCHEMA_PATH
    from healnet.settings import (
        HealnetSettings,
        RunSettings,
        Settings,
        TrainingSettings,
        settings_from_config,
    )

    schema = yaml.safe_load(SCHEMA_PATH.read_text())["properties"]
    training_keys = list(schema["training"]["properties"])
    names = {cls: [f.name for f in dataclasses.fields(cls)]
             for cls in (TrainingSettings, RunSettings, HealnetSettings, Settings)}
    assert names[TrainingSettings] == [k for k in training_keys if k not in names[RunSettings]]
    assert sorted(names[TrainingSettings] + names[RunSettings]) == sorted(training_keys)
    assert names[HealnetSettings] == list(schema["healnet"]["properties"])
    for cls in names:
        assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   for f in dataclasses.fields(cls)), cls
    settings = settings_from_config(validate_config({"cohorts": {"X": {"demo": True}}}))
    assert settings.training.baseline_hidden == schema["training"]["properties"]["baseline_hidden"]["default"]
    assert settings.run.workers == "auto"
    assert settings.n_bins == schema["omics"]["properties"]["n_bins"]["default"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.training.lr = 1.0  # type: ignore[misc]


def test_training_snapshot_holds_what_changes_what_a_model_learns(tmp_path: Path) -> None:
    from healnet.settings import load_settings, settings_from_config, training_snapshot

    config = load_config(REPO / "config.yaml")
    snn, healnet = training_snapshot(config, "DEMO", "snn"), training_snapshot(config, "DEMO", "healnet")
    assert snn["cohorts"] == {"DEMO": config["cohorts"]["DEMO"]} and snn["omics"] == {"n_bins": 4}
    run_keys = {"workers", "threads", "save_state_minutes", "feature_cache", "bags_on_device", "device"}
    assert not run_keys & set(snn["training"]) and not run_keys & set(healnet["training"])
    assert "modality_dropout" not in snn["training"] and "healnet" not in snn  # an SNN reads neither
    assert "baseline_hidden" not in healnet["training"] and healnet["healnet"] == config["healnet"]
    # a run setting changes no snapshot; a learning setting does
    edited = copy.deepcopy(config)
    edited["training"].update(workers=3, threads=4, device="cpu", bags_on_device=False)
    assert training_snapshot(edited, "DEMO", "healnet") == healnet
    edited["training"]["lr"] = 0.5
    assert training_snapshot(edited, "DEMO", "healnet")["training"]["lr"] == 0.5
    # the snapshot is the config a training job loads: the same learning settings come back
    (tmp_path / "snapshot.json").write_text(json.dumps(healnet, sort_keys=True))
    assert load_settings(tmp_path / "snapshot.json").training == settings_from_config(config).training
