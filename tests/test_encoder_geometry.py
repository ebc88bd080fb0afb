"""Each encoder's patch geometry decides its tiling, encoders of one geometry share their tiles, and
`extract.encoders` / `extract.weights` are read as the configuration reference says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from workflow_runner import job_blocks, snakemake

from healnet.config import configured_encoders, encoder_weights, tiles_geometry
from preprocessing.features.registry import REGISTRY, patch_geometry
from preprocessing.tiling.tiles import geometry_name, parse_geometry

TINY = {"cohorts": {"TINY": {"demo": True}}, "demo": {"patients": 8, "seed": 3, "long_side_px": 3000},
        "omics": {"n_folds": 3, "n_bins": 3}, "models": ["snn", "abmil"]}


def test_each_encoder_cuts_patches_at_the_size_and_resolution_it_was_trained_at() -> None:
    assert patch_geometry("uni") == (224, 0.5)
    assert patch_geometry("conch_v15") == (448, 0.5)  # CONCH v1.5's own input size
    assert patch_geometry("efficientnet_lite0") == patch_geometry("resnet50_trunc") == (256, 0.5)
    assert patch_geometry("vit_small_patch16_224") == (256, 0.5)  # not registered: CLAM's grid
    assert patch_geometry("uni", patch_size=256) == (256, 0.5)  # the config replaces one part
    assert patch_geometry("uni", mpp=0.25) == (224, 0.25)
    for info in REGISTRY.values():  # a foundation model reads its input size; the CNNs resize 256
        assert info.patch_size == (256 if info.kind == "builtin" else info.input_size), info.name
    config = {"tiling": {"patch_size": None, "target_mpp": None}}
    assert tiles_geometry(config, "virchow2") == "224px_0.5mpp"


@pytest.mark.parametrize(("size", "mpp"), [(224, 0.5), (256, 0.25), (448, 1.0), (512, 0.2425)])
def test_a_geometry_name_reads_back(size: int, mpp: float) -> None:
    assert parse_geometry(geometry_name(size, mpp)) == (size, mpp)


@pytest.mark.parametrize("name", ["224px", "224px_0.5", "x_0.5mpp", "224px_mpp", "224px_-1mpp"])
def test_other_text_is_no_geometry(name: str) -> None:
    with pytest.raises(ValueError, match="not a patch geometry"):
        parse_geometry(name)


def test_encoders_replace_encoder_and_weights_map_each_one() -> None:
    one = {"encoder": "uni", "encoders": None, "weights": "/models/uni"}
    assert configured_encoders(one) == ["uni"] and encoder_weights(one, "uni") == "/models/uni"
    two = {"encoder": "efficientnet_lite0", "encoders": ["uni", "virchow2"],
           "weights": {"uni": "/models/uni"}}
    assert configured_encoders(two) == ["uni", "virchow2"]
    assert encoder_weights(two, "uni") == "/models/uni" and encoder_weights(two, "virchow2") is None
    with pytest.raises(ValueError, match="one file for several encoders"):
        encoder_weights({**two, "weights": "/models/uni"}, "uni")
    with pytest.raises(ValueError, match="names gigapath, which extract.encoders does not list"):
        encoder_weights({**two, "weights": {"gigapath": "/g"}}, "uni")


def test_the_workflow_tiles_once_per_geometry_and_extracts_from_the_encoder_s_tiles(tmp_path: Path) -> None:
    """Three encoders, two of them (the CNNs) cutting the same 256 px patches, and UNI its 224 px
    ones: every slide is tiled twice, not three times, and UNI's extraction reads its own tiles."""
    config = TINY | {"extract": {"encoders": ["efficientnet_lite0", "uni", "resnet50_trunc"]}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    dry = snakemake(tmp_path, "-n", "-p", "--cores", "1")
    assert dry.returncode == 0, dry.stderr[-3000:]
    jobs = job_blocks(dry.stdout)
    tiles = [j for j in jobs if j["rule"] == "tile"]
    sizes = {re.search(r"--patch-size (\d+)", j["shell"])[1] for j in tiles}
    slides = {j["wildcards"].split("slide=")[1] for j in tiles}
    assert sizes == {"256", "224"} and len(tiles) == 2 * len(slides)
    assert all(" --target-mpp 0.5 " in j["shell"] for j in tiles)
    for job in (j for j in jobs if j["rule"] == "extract"):
        encoder = re.search(r"encoder=([\w.-]+)", job["wildcards"])[1]
        geometry = "224px_0.5mpp" if encoder == "uni" else "256px_0.5mpp"
        assert f"/tiles/TINY/{geometry}/" in job["input"], job
    trained = {re.search(r"encoder=([\w.-]+), model=(\w+)", j["wildcards"]).groups()
               for j in jobs if j["rule"] == "train"}
    assert trained == {("none", "snn"), ("efficientnet_lite0", "abmil"), ("uni", "abmil"),
                       ("resnet50_trunc", "abmil")}


def test_one_weights_file_for_several_encoders_stops_the_run(tmp_path: Path) -> None:
    config = TINY | {"extract": {"encoders": ["uni", "virchow2"], "weights": "/models/uni.bin"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    dry = snakemake(tmp_path, "-n", "--cores", "1")
    assert dry.returncode != 0
    assert "config key extract.weights: one file for several encoders" in dry.stdout + dry.stderr
    config["extract"] = {"encoders": ["uni", "none"]}  # `none` names the models that read no slides
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    dry = snakemake(tmp_path, "-n", "--cores", "1")
    assert dry.returncode != 0 and "extract" in dry.stdout + dry.stderr and "none" in dry.stdout + dry.stderr
