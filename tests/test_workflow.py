"""The whole Snakemake DAG on a tiny demo cohort, the lint, and the SLURM profile's dry run."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from workflow_runner import REPO, SNAKEMAKE, job_blocks, job_counts, snakemake

# The tiny run writes under an output folder of its own, nested and with a space in its name, so that
# every rule's paths are seen to follow `outdir` and to be quoted in its command.
OUT = "runs/tiny run"
TINY = {
    "cohorts": {"TINY": {"demo": True}},
    "outdir": OUT,
    "demo": {"patients": 12, "seed": 3, "long_side_px": 3000, "corrupt_slides": 1},
    "omics": {"n_folds": 3, "n_bins": 3},
    "training": {"epochs": 3, "max_patches_train": 256},
    "healnet": {"depth": 1, "n_latents": 8, "latent_dim": 32},
    "report": {"heatmap_slides": 2},
}

# The second encoder of the two-encoder run: any timm model, with the CNNs' geometry (256 px at 0.5)
SECOND = "mobilenetv3_small_100"
# Every rule but `all`, each named after what it runs (see the name test below).
RULES = {"demo", "tile", "encoder", "extract", "import_features", "omics", "config_snapshot", "search",
         "train", "collect", "evaluate", "report"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("tiny")
    (workdir / "config.yaml").write_text(yaml.safe_dump(TINY))
    run = snakemake(workdir, "--cores", "2")
    assert run.returncode == 0, run.stderr[-4000:]
    return workdir


def test_whole_dag_runs_and_second_run_does_nothing(tiny_run: Path) -> None:
    out = tiny_run / OUT
    summary = pd.read_csv(out / "results/TINY/summary.csv")
    assert {"healnet", "snn", "abmil", "perceiver", "late_fusion", "coxph"} <= set(summary["model"])
    assert summary["c_index_mean"].between(0, 1).all()
    assert (out / "results/TINY/summary.md").read_text().count("|") > 10
    assert (out / "results/TINY/summary.html").read_text(encoding="utf-8").count("<tr") > 5
    for fig in ["km_curves.png", "c_index.png", "attention_wsi.png", "attention_omics.png"]:
        assert (out / "results/TINY/figures" / fig).stat().st_size > 5000
    # the models are trained with the configured number of time bins (the omics step's), and a model
    # not built from the healnet section is not given it (a change there does not retrain it)
    snn = torch.load(out / "models/TINY/none/snn/fold0.pt", weights_only=True)
    assert snn["time_bins"]["n_bins"] == 3 and len(snn["time_bins"]["edges"]) == 4
    assert "healnet" not in json.loads((out / "results/TINY/none/snn/config.json").read_text())
    again = snakemake(tiny_run, "--cores", "2")
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr


def test_every_file_the_run_writes_is_under_outdir(tiny_run: Path) -> None:
    """The working directory keeps only the config and Snakemake's own folder; logs and rule
    benchmarks are in the output folder with the rest, one folder per rule."""
    assert {p.name for p in tiny_run.iterdir()} <= {"config.yaml", ".snakemake", OUT.split("/")[0]}
    out = tiny_run / OUT
    made = {"data", "tiles", "qc", "features", "omics", "models", "results", "logs", "benchmarks"}
    assert made <= {p.name for p in out.iterdir()} <= made | {"report.html"}
    ran = RULES - {"import_features", "search"}  # the tiny run imports no features and searches nothing
    assert {p.name for p in (out / "logs").iterdir()} == ran
    assert {p.name for p in (out / "benchmarks").iterdir()} == ran
    assert (out / "logs/collect/TINY/efficientnet_lite0/healnet.log").is_file()
    assert (out / "benchmarks/train/TINY/efficientnet_lite0/healnet/fold0.tsv").is_file()


def test_a_rule_its_log_its_benchmark_and_its_command_share_one_name(tmp_path: Path) -> None:
    """Rule `x` logs to {outdir}/logs/x/..., benchmarks to {outdir}/benchmarks/x/... and runs
    `healnet x` (`healnet import-features` for import_features; config_snapshot, which writes a file
    with printf, runs no healnet command). Read from the dry run of a fresh demo cohort and a cohort
    of imported features, with a model search, which plans a job of every rule the Snakefile
    defines. The search is one job per fold and candidate, and a fold's training waits for them."""
    (tmp_path / "h5").mkdir()
    (tmp_path / "h5" / "TCGA-AA-0001-01Z-00-DX1.h5").touch()
    (tmp_path / "clinical.tsv").touch()
    imported = {"omics": str(tmp_path / "clinical.tsv"),
                "features": {"format": "clam", "path": str(tmp_path / "h5"), "encoder": "uni"}}
    config = copy.deepcopy(TINY)
    config["cohorts"]["IMPORTED"] = imported
    config["models"] = ["healnet", "snn", "coxph"]
    config["training"]["search"] = {"lr": [0.001, 0.0002], "epochs": [2, 3, 4]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    listed = snakemake(tmp_path, "--list-rules")
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert set(listed.stdout.split()) == RULES | {"all"}
    dry = snakemake(tmp_path, "-n", "-p", "--cores", "1")
    assert dry.returncode == 0, dry.stderr[-3000:]
    jobs = [job for job in job_blocks(dry.stdout) if job["rule"] != "all"]
    assert {job["rule"] for job in jobs} == RULES
    for job in jobs:
        rule = job["rule"]
        assert job["log"].startswith(f"{OUT}/logs/{rule}/"), job
        assert job["benchmark"].startswith(f"{OUT}/benchmarks/{rule}/"), job
        assert all(path.startswith(f"{OUT}/") for path in job["output"].split(", ")), job
        command = re.search(r" -m healnet\.cli ([\w-]+) ", job["shell"])
        if rule == "config_snapshot":
            assert command is None and job["shell"].startswith("printf "), job
        else:
            assert command is not None and command.group(1).replace("-", "_") == rule, job
    # the imported cohort is neither tiled nor extracted, and the demo cohort is not imported
    assert not [j for j in jobs if j["rule"] in ("tile", "extract") and "IMPORTED" in j["wildcards"]]
    assert not [j for j in jobs if j["rule"] == "import_features" and "TINY" in j["wildcards"]]
    searched = {(j["wildcards"], j["output"]) for j in jobs if j["rule"] == "search"}
    # two cohorts, each with HEALNet and the SNN (the Cox model has nothing to search), 3 folds, 6 candidates
    assert len(searched) == 2 * 2 * 3 * 6 and not [w for w, _ in searched if "coxph" in w]
    fold = next(j for j in jobs if j["rule"] == "train" and j["wildcards"].startswith("cohort=TINY")
                and "model=snn" in j["wildcards"] and j["wildcards"].endswith("fold=1"))
    scores = [f"{OUT}/results/TINY/none/snn/search/fold1/setting{i}.json" for i in range(6)]
    assert set(scores) <= set(fold["input"].split(", ")) and "--search-dir" in fold["shell"]


def failed_fold(model: str, fold: int) -> list[str]:
    """What a failed fold job leaves missing: its outputs (Snakemake removes them) and what follows."""
    run = f"{'none' if model == 'snn' else 'efficientnet_lite0'}/{model}"
    return [
        f"{OUT}/models/TINY/{run}/fold{fold}.pt",
        f"{OUT}/results/TINY/{run}/fold{fold}",
        f"{OUT}/results/TINY/{run}/folds.csv",
        f"{OUT}/results/TINY/{run}/predictions.parquet",
        f"{OUT}/results/TINY/summary.csv",
    ]


def dry_run_without(workdir: Path, lost: list[str]) -> subprocess.CompletedProcess:
    """The dry run of a finished run with these outputs missing (moved aside, then put back)."""
    for name in lost:
        (workdir / name).rename(workdir / f"{name}.aside")
    try:
        dry = snakemake(workdir, "-n", "--cores", "2")
    finally:
        for name in lost:
            (workdir / f"{name}.aside").rename(workdir / name)
    assert dry.returncode == 0, dry.stderr[-3000:]
    return dry


def test_an_interrupted_run_retrains_only_the_missing_fold(tiny_run: Path) -> None:
    """Each fold is its own job: when one fold's job failed (Snakemake then removes its outputs) and
    nothing downstream ran, the rerun trains that fold alone, not its finished siblings."""
    dry = dry_run_without(tiny_run, failed_fold("healnet", 1))
    jobs = job_counts(dry.stdout)
    assert jobs["train"] == "1" and jobs["collect"] == "1"
    assert "wildcards: cohort=TINY, encoder=efficientnet_lite0, model=healnet, fold=1" in dry.stdout
    assert set(jobs) - {"total"} == {"train", "collect", "evaluate", "report", "all"}
    # the same fold killed when an earlier run had finished: that run's joined results are still on
    # disk and must not pass for current (Snakemake does not remake a missing input by itself)
    killed = job_counts(dry_run_without(tiny_run, failed_fold("healnet", 1)[:2]).stdout)
    assert killed["train"] == "1" and killed["collect"] == "1" and killed["evaluate"] == "1"


def test_a_lost_store_re_extracts_that_slide_alone(tiny_run: Path) -> None:
    """A store deleted after a training job failed on it (damaged on disk): the rerun re-extracts that
    slide only. (When the encoder file was temporary, remaking it re-extracted every slide.)"""
    store = sorted((tiny_run / OUT / "features/TINY/efficientnet_lite0").glob("*.zarr"))[0]
    dry = dry_run_without(tiny_run, [str(store.relative_to(tiny_run)), *failed_fold("abmil", 0)])
    jobs = job_counts(dry.stdout)
    assert jobs["extract"] == "1" and "encoder" not in jobs and "tile" not in jobs
    assert f"output: {store.relative_to(tiny_run)}" in dry.stdout
    assert "model=abmil, fold=0" in dry.stdout and "model=snn" not in dry.stdout  # the SNN reads no slides
    # an extraction killed on a rerun (its store deleted, everything after it still there)
    alone = job_counts(dry_run_without(tiny_run, [str(store.relative_to(tiny_run))]).stdout)
    assert alone["extract"] == "1" and "train" in alone and "tile" not in alone


def test_run_settings_rerun_nothing_but_a_training_setting_retrains(tiny_run: Path) -> None:
    """Tuning readers, batch size, threads or state saving for a cluster must not throw away finished
    stores and models (Snakemake deletes a job's outputs before rerunning it); the learning rate must
    retrain."""
    original = (tiny_run / "config.yaml").read_text()

    def dry_run_with(extract: dict, training: dict, reorder: bool = False, **sections: dict
                     ) -> subprocess.CompletedProcess:
        edited = copy.deepcopy(TINY)
        edited.setdefault("extract", {}).update(extract)
        edited["training"].update(training)
        for name, values in sections.items():
            edited.setdefault(name, {}).update(values)
        if reorder:  # every section's keys in reverse order (the run wrote them sorted)
            edited = {k: dict(reversed(v.items())) if isinstance(v, dict) else v for k, v in edited.items()}
        (tiny_run / "config.yaml").write_text(yaml.safe_dump(edited, sort_keys=not reorder))
        return snakemake(tiny_run, "-n", "--cores", "2")

    try:
        tuned = dry_run_with({"workers": 3, "batch_size": 16, "threads": 2},
                             {"workers": 2, "threads": 2, "save_state_minutes": 1, "feature_cache": "/tmp",
                              "bags_on_device": True}, tiling={"on_slide_error": "fail"})
        retrained = dry_run_with({}, {"lr": 0.001})
        # only the models built from the healnet section, or using modality dropout, retrain
        shape = dry_run_with({}, {}, healnet={"depth": 2})
        dropout = dry_run_with({}, {"modality_dropout": 0.25})
        bins = dry_run_with({}, {}, omics={"n_bins": 2})
        # the same values in another key order, defaults written out: nothing to redo
        reordered = dry_run_with({}, {"alpha": 0.4}, reorder=True, tiling={"patch_size": 256},
                                 demo={"long_side_px": 3000}, omics={"seed": 0},
                                 report={"top_omic_features": 15})
        # settings a model does not read leave it alone
        widths = dry_run_with({}, {"baseline_hidden": 128})
        screen = dry_run_with({}, {"omic_max_features": 4})
        patches = dry_run_with({}, {"max_patches_train": 128})
    finally:
        (tiny_run / "config.yaml").write_text(original)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert "Nothing to be done" in tuned.stdout + tuned.stderr
    jobs = job_counts(retrained.stdout)
    assert jobs["train"] == "15" and "extract" not in jobs
    assert job_counts(shape.stdout)["train"] == "6" and "model=snn" not in shape.stdout
    assert job_counts(dropout.stdout)["train"] == "9" and "model=abmil" not in dropout.stdout
    assert job_counts(bins.stdout)["train"] == "18"
    assert reordered.returncode == 0, reordered.stderr[-3000:]
    assert "Nothing to be done" in reordered.stdout + reordered.stderr, job_counts(reordered.stdout)
    assert job_counts(widths.stdout)["train"] == "9"  # snn, abmil, late_fusion
    assert "model=healnet" not in widths.stdout and "model=perceiver" not in widths.stdout
    assert job_counts(screen.stdout)["train"] == "15" and "model=abmil" not in screen.stdout
    assert job_counts(patches.stdout)["train"] == "12" and "model=snn" not in patches.stdout


def test_corrupt_slide_is_listed_and_its_patient_has_no_slide(tiny_run: Path) -> None:
    failed = pd.read_csv(tiny_run / OUT / "results/TINY/failed_slides.csv")
    bad = failed[failed["status"] == "failed"]
    assert len(bad) == 1 and bad["reason"].str.len().iloc[0] > 5
    manifest = pd.read_parquet(tiny_run / OUT / "omics/TINY/manifest.parquet")
    slide = bad["slide"].iloc[0]
    row = manifest[manifest["patient"] == slide[:12]]
    assert all(slide not in list(s) for s in row["slides"])


def test_a_second_encoder_shares_the_tiles_and_joins_the_summary(tiny_run: Path, tmp_path: Path) -> None:
    """`extract.encoders: [a, b]` extracts b beside a, trains the slide models on each, keeps one
    training of the models that read no slides, and evaluates all in one table (model x encoder x
    setting); b's geometry is a's (256 px at 0.5 um/px), so no slide is tiled again. Taking b out
    again reruns no tiling, extraction or training: only the summary and the figures are redone."""
    import timm

    run = Path(shutil.copytree(tiny_run, tmp_path / "run", symlinks=True))
    weights = tmp_path / "mobilenet.pth"  # in the layout of timm's checkpoint (a small CNN: fast on CPU)
    torch.save(timm.create_model(SECOND, pretrained=False).state_dict(), weights)
    config = copy.deepcopy(TINY) | {"models": ["snn", "abmil"]}
    two = {"encoders": ["efficientnet_lite0", SECOND], "weights": {SECOND: str(weights)}}
    (run / "config.yaml").write_text(yaml.safe_dump(config | {"extract": two}))
    ran = snakemake(run, "--cores", "2")
    assert ran.returncode == 0, ran.stderr[-4000:]
    jobs = job_counts(ran.stdout + ran.stderr)
    slides = len(list((run / OUT / "features/TINY/efficientnet_lite0").glob("*.zarr")))
    assert "tile" not in jobs and jobs["extract"] == str(slides) and jobs["train"] == "3", jobs
    summary = pd.read_csv(run / OUT / "results/TINY/summary.csv")
    full = summary[summary["setting"] == "full"]
    assert sorted(zip(full["model"], full["encoder"], strict=True)) == [
        ("abmil", "efficientnet_lite0"), ("abmil", SECOND), ("snn", "none")]
    assert f"| abmil | {SECOND} | full |" in (run / OUT / "results/TINY/summary.md").read_text()
    assert (run / OUT / f"features/TINY/{SECOND}/encoder.pt").is_file()

    one = {"encoders": ["efficientnet_lite0"]}
    (run / "config.yaml").write_text(yaml.safe_dump(config | {"extract": one}))
    dry = snakemake(run, "-n", "--cores", "2")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert set(job_counts(dry.stdout)) - {"total"} <= {"evaluate", "report", "all"}


def test_a_cohort_of_trident_files_trains_as_the_same_features_extracted_here(tiny_run: Path,
                                                                              tmp_path: Path) -> None:
    """A cohort named with `features: {format: trident, ...}` is imported instead of tiled and
    extracted; with the tiny run's own features and omic tables, as TRIDENT files, its models score
    exactly as the tiny run's (same folds, same seeds)."""
    from factory import write_trident

    from preprocessing.features.store import read_store, store_attrs

    out = tiny_run / OUT
    h5 = tmp_path / "trident"
    h5.mkdir()
    for store in sorted((out / "features/TINY/efficientnet_lite0").glob("*.zarr")):
        attrs = store_attrs(store)
        if attrs["n_patches"]:  # the corrupt slide has no features: TRIDENT writes no file for it
            features, coords = read_store(store)
            write_trident(h5 / f"{store.stem}.h5", features, coords, encoder="efficientnet_lite0",
                          patch_size_level0=attrs["patch_size_level0"], level0_width=10**6,
                          level0_height=10**6)
    config = copy.deepcopy(TINY) | {"models": ["abmil"], "outdir": str(tmp_path / "out")}
    config["cohorts"] = {"TINY": {"omics": str(out / "data/TINY/omics"), "features": {
        "format": "trident", "path": str(h5), "encoder": "efficientnet_lite0"}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    ran = snakemake(tmp_path, "--cores", "2")
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    jobs = job_counts(ran.stdout + ran.stderr)
    assert "tile" not in jobs and "extract" not in jobs
    assert jobs["import_features"] == str(len(list(h5.iterdir())))
    key = ["model", "encoder", "setting"]
    got = pd.read_csv(tmp_path / "out/results/TINY/summary.csv").set_index(key).sort_index()
    ours = pd.read_csv(out / "results/TINY/summary.csv").set_index(key).sort_index().loc[got.index]
    pd.testing.assert_frame_equal(got, ours)


def test_a_cohort_mixing_svs_dicom_and_ome_tiff_runs_end_to_end(tiny_run: Path, tmp_path: Path) -> None:
    """Six of the tiny cohort's slides in a folder of three formats (two each: SVS, DICOM series made
    by wsidicomizer, OME-TIFF pyramids), with its omic tables, as a user's own cohort: every slide is
    tiled at the pixel size of its own metadata to the SVS's patch grid, and embedded to the SVS's
    features (mean cosine >= 0.99: the SVS's 40x tiles are read by the JPEG tile reader at half
    scale, the DICOM ones by OpenSlide, the OME-TIFF ones re-encoded), and the models train."""
    from converters import dicomize, write_ome_tiff

    from preprocessing.features.store import read_store
    from preprocessing.tiling.tiles import read_tiles

    out = tiny_run / OUT
    slides = tmp_path / "slides"
    slides.mkdir()
    kinds = {}  # two slides of each format; the other patients are in the cohort with omics alone
    tiled = sorted(p.stem for p in (out / "tiles/TINY").glob("*/*.parquet") if read_tiles(p)[0].shape[0])
    for i, stem in enumerate(tiled[:6]):
        svs = out / f"data/TINY/slides/{stem}.svs"
        kinds[stem] = kind = ("svs", "dicom", "ome")[i % 3]
        if kind == "svs":
            (slides / svs.name).symlink_to(svs)
        elif kind == "dicom":
            dicomize(svs, slides / svs.stem, thumbnail=False)
        else:
            write_ome_tiff(svs, slides / f"{svs.stem}.ome.tif")
    config = copy.deepcopy(TINY) | {"models": ["abmil"], "outdir": str(tmp_path / "out")}
    config["cohorts"] = {"MIXED": {"omics": str(out / "data/TINY/omics"), "slides": str(slides)}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    ran = snakemake(tmp_path, "--cores", "2")
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    mine = tmp_path / "out"
    source = {"svs": "openslide", "dicom": "dicom", "ome": "ome"}
    for stem, kind in kinds.items():
        meta = read_tiles(one_file(mine / "tiles/MIXED", f"*/{stem}.parquet"))[1]
        assert meta["mpp_source"] == source[kind], (stem, meta["mpp_detail"])
        theirs, coords = read_store(out / f"features/TINY/efficientnet_lite0/{stem}.zarr")
        ours, our_coords = read_store(mine / f"features/MIXED/efficientnet_lite0/{stem}.zarr")
        assert abs(len(ours) - len(theirs)) <= max(1, 0.02 * len(theirs)), (stem, kind)
        index = {tuple(c): i for i, c in enumerate(coords)}
        pairs = [(index[tuple(c)], j) for j, c in enumerate(our_coords) if tuple(c) in index]
        a, b = theirs[[i for i, _ in pairs]], ours[[j for _, j in pairs]]
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cosine.mean() >= 0.99, (stem, kind, cosine.mean())
    assert set(kinds.values()) == {"svs", "dicom", "ome"}
    summary = pd.read_csv(mine / "results/MIXED/summary.csv")
    assert "abmil" in set(summary["model"])


def one_file(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, (pattern, found)
    return found[0]


def test_snakemake_report_collects_tables_and_figures(tiny_run: Path) -> None:
    run = snakemake(tiny_run, "--report", str(tiny_run / OUT / "report.html"))
    assert run.returncode == 0, run.stderr[-3000:]
    html = (tiny_run / OUT / "report.html").read_text(errors="replace")
    for name in ["km_curves.png", "attention_wsi.png", "summary.csv", "summary.html", "failed_slides.csv"]:
        assert name in html


def test_single_output_by_path_runs_only_what_it_needs(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY))
    dry = snakemake(tmp_path, "-n", f"{OUT}/omics/TINY/manifest.parquet")
    assert dry.returncode == 0, dry.stderr[-3000:]
    jobs = job_counts(dry.stdout)
    assert set(jobs) - {"total"} == {"demo", "tile", "omics"}


def test_a_config_file_is_the_whole_config_also_without_replace_workflow_config(tmp_path: Path) -> None:
    """Cluster jobs get the user's --configfile without --replace-workflow-config: the repository's
    config.yaml (the DEMO cohort) must not be merged in, so that every job sees what the plan saw."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**TINY, "models": ["snn"]}))
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--configfile",
           str(tmp_path / "config.yaml"), "-n", "--cores", "1"]
    dry = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "cohort=TINY" in dry.stdout and "cohort=DEMO" not in dry.stdout
    assert job_counts(dry.stdout)["train"] == "3"  # snn alone, 3 folds: not config.yaml's models


def test_lint_is_clean() -> None:
    run = subprocess.run([SNAKEMAKE, "--lint", "-s", str(REPO / "Snakefile")], capture_output=True,
                         text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0
    assert "Congratulations" in run.stdout + run.stderr


def test_slurm_dry_run_places_gpu_jobs(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY))
    run = snakemake(tmp_path, "-n", "--profile", str(REPO / "workflow/profiles/slurm"))
    assert run.returncode == 0, run.stderr[-3000:]
    resources = {job["rule"]: job["resources"] for job in job_blocks(run.stdout) if "resources" in job}
    for gpu_rule in ["extract", "train"]:
        assert "slurm_partition=gpu" in resources[gpu_rule] and "gpu=1" in resources[gpu_rule]
    for cpu_rule in ["tile", "collect"]:
        assert "slurm_partition=cpu" in resources[cpu_rule] and "gpu=" not in resources[cpu_rule]


def test_planning_a_thousand_slide_cohort_takes_seconds(tmp_path: Path) -> None:
    """A first dry run on a large cohort answers in seconds. The slide folder is listed once per
    Snakemake process; listed once per job, planning grew with the square of the slides (45 s for
    1,000 slides on the 2-core development machine, against 11 s now)."""
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(1000):
        (slides / f"TCGA-ZZ-{i:04d}-01Z-00-DX1.svs").touch()
    (tmp_path / "omics").mkdir()  # the omics step reads every table in it
    config = {"cohorts": {"BIG": {"slides": str(slides), "omics": str(tmp_path / "omics")}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    dry = snakemake(tmp_path, "-n", "--cores", "2", "--quiet", "rules")
    seconds = time.perf_counter() - start
    assert dry.returncode == 0, dry.stderr[-3000:]
    jobs = job_counts(dry.stdout)
    assert jobs["tile"] == jobs["extract"] == "1000"
    assert seconds < 30, f"planning 1,000 slides took {seconds:.1f} s"


def test_slides_in_gdc_download_folders_are_found(tmp_path: Path) -> None:
    """The GDC Data Transfer Tool saves each slide in a folder named by its file UUID; those slides
    are planned like a flat folder's, and two files with one slide name stop the run naming both."""
    slides = tmp_path / "slides"
    names = [f"TCGA-ZZ-{i:04d}-01Z-00-DX1.{i:08d}-AAAA.svs" for i in range(3)]
    for i, name in enumerate(names):
        (slides / f"uuid-{i}").mkdir(parents=True)
        (slides / f"uuid-{i}" / name).touch()
    (slides / "uuid-0" / "annotations.txt").touch()
    (slides / ".hidden").mkdir()
    (slides / ".hidden" / "TCGA-ZZ-9999-01Z-00-DX1.svs").touch()
    (tmp_path / "omics").mkdir()  # the omics step reads every table in it
    config = {"cohorts": {"GDC": {"slides": str(slides), "omics": str(tmp_path / "omics")}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    dry = snakemake(tmp_path, "-n", "--cores", "1", "-p")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert job_counts(dry.stdout)["tile"] == "3"
    assert f"uuid-1/{names[1]}" in dry.stdout   # the tile job reads the slide where it lies

    (slides / "copy").mkdir()
    (slides / "copy" / names[2]).touch()
    clash = snakemake(tmp_path, "-n", "--cores", "1")
    assert clash.returncode != 0
    assert f"uuid-2/{names[2]}" in clash.stdout + clash.stderr
    assert f"copy/{names[2]}" in clash.stdout + clash.stderr


def test_a_cohort_named_like_a_tcga_project_is_planned(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "TCGA-ZZ-0001-01Z-00-DX1.svs").touch()
    (tmp_path / "omics").mkdir()  # the omics step reads every table in it
    config = {"cohorts": {"TCGA-LUAD": {"slides": str(slides), "omics": str(tmp_path / "omics")}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    dry = snakemake(tmp_path, "-n", "--cores", "1", "--quiet", "rules")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert job_counts(dry.stdout)["report"] == "1"


def test_jobs_get_the_configured_models_error_mode_and_files(tmp_path: Path) -> None:
    """Results of a model dropped from `models:` stay on disk, so the report job must name the models
    it plots; extraction records a slide it cannot read, as tiling does; and the files the config
    names (MPP overrides, weights, stain reference, omic tables, split files) are inputs, so that
    editing one reruns its jobs."""
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "TCGA-ZZ-0001-01Z-00-DX1.svs").touch()
    (tmp_path / "splits").mkdir()
    (tmp_path / "omics").mkdir()
    files = {name: tmp_path / name for name in ("overrides.csv", "weights.pth", "reference.png",
                                                "omics/clinical.tsv", "splits/splits_0.csv")}
    for path in files.values():
        path.touch()
    config = {"cohorts": {"LUAD": {"slides": str(slides), "omics": str(tmp_path / "omics"),
                                   "splits": str(tmp_path / "splits")}},
              "models": ["snn", "healnet"], "tiling": {"mpp_overrides": str(files["overrides.csv"])},
              "extract": {"weights": str(files["weights.pth"]), "stain_norm": "macenko",
                          "stain_reference": str(files["reference.png"])}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    dry = snakemake(tmp_path, "-n", "--cores", "1", "-p")
    assert dry.returncode == 0, dry.stderr[-3000:]
    lines = dry.stdout.splitlines()
    report_command = [line for line in lines if " report --cohort LUAD" in line]
    assert len(report_command) == 1 and " --runs none/snn,efficientnet_lite0/healnet " in report_command[0]
    extract_command = [line for line in lines if " extract " in line and "--encoder-file" in line]
    assert len(extract_command) == 1 and "--on-slide-error record" in extract_command[0]
    inputs = [line for line in lines if line.strip().startswith("input:")]
    for name, path in files.items():
        assert any(str(path) in line for line in inputs), name
