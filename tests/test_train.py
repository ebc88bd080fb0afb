"""Cross-validated training end to end on a tiny synthetic cohort, evaluation summary, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
import zarr

pytest.importorskip("preprocessing.omics.transforms")
pytest.importorskip("preprocessing.omics.labels")

from healnet.cli import main as healnet_main  # noqa: E402
from healnet.data.checkpoints import load_checkpoint  # noqa: E402
from healnet.evaluation import summary as evaluate  # noqa: E402
from healnet.report import attention as explain  # noqa: E402
from healnet.training import loop, memory  # noqa: E402
from preprocessing.core.errors import InputError  # noqa: E402

# The device of every `healnet train` call here; HEALNET_TEST_DEVICE=cuda runs them on a GPU.
DEVICE = os.environ.get("HEALNET_TEST_DEVICE", "cpu")
N_PATIENTS, N_FOLDS, DIM = 24, 3, 16
NO_WSI = {"TCGA-AA-0003", "TCGA-AA-0010", "TCGA-AA-0017"}  # no slide, or a slide without patches
NO_OMICS = {"TCGA-AA-0005", "TCGA-AA-0012"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_store(path: Path, feats: np.ndarray, coords: np.ndarray, complete: bool = True) -> None:
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array(
        "features", data=feats.astype(np.float16), chunks=(max(1, min(len(feats), 32)), feats.shape[1])
    )
    group.create_array("coords", data=coords.astype(np.int64), chunks=(max(1, min(len(coords), 32)), 2))
    group.attrs.update({"encoder": "synthetic", "n_patches": len(feats)})
    if complete:
        group.attrs["complete"] = True


def make_cohort(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Omics folder + feature stores; risk z drives survival, some omic genes and some patches."""
    rng = np.random.default_rng(seed)
    patients = [f"TCGA-AA-{i:04d}" for i in range(N_PATIENTS)]
    z = rng.normal(size=N_PATIENTS)
    death = rng.exponential(30 * np.exp(-z))
    censor = rng.uniform(10, 80, N_PATIENTS)
    time_, event = np.minimum(death, censor), (death <= censor).astype(int)
    features_dir = root / "features"
    features_dir.mkdir(parents=True)
    slides = []
    for i, p in enumerate(patients):
        stem = f"{p}-01Z-00-DX1.{i:08X}"
        if p == "TCGA-AA-0003":
            slides.append([])  # no slide at all
            continue
        n = 0 if p == "TCGA-AA-0010" else int(rng.integers(10, 40))
        feats = rng.normal(size=(n, DIM))
        hot = rng.random(n) < 0.3
        feats[hot, :4] += z[i]  # a third of the patches carry the risk signal
        coords = rng.integers(0, 20, size=(n, 2)) * 256
        if p != "TCGA-AA-0017":  # listed in the manifest but never extracted: treated as missing
            write_store(features_dir / f"{stem}.zarr", feats, coords)
        slides.append([stem])
    manifest = pd.DataFrame(
        {
            "patient": patients,
            "time": time_,
            "event": event,
            "slides": slides,
            "has_wsi": [len(s) > 0 for s in slides],
            "has_omics": [p not in NO_OMICS for p in patients],
        }
    )
    rna = rng.normal(size=(N_PATIENTS, 10)) + np.outer(z, np.r_[np.ones(3), np.zeros(7)])
    cnv = rng.integers(-2, 3, size=(N_PATIENTS, 5)).astype(float)
    feat = pd.DataFrame(
        np.c_[rna, cnv].astype(np.float32),
        index=pd.Index(patients, name="patient"),
        columns=[f"rna:G{j}" for j in range(10)] + [f"cnv:C{j}" for j in range(5)],
    )
    feat.iloc[1, 2] = np.nan  # one missing value, imputed per fold
    feat = feat.drop(index=sorted(NO_OMICS))
    folds = np.arange(N_PATIENTS) % N_FOLDS
    splits = pd.DataFrame(
        [
            {"fold": k, "patient": p, "role": "val" if folds[i] == k else "train"}
            for k in range(N_FOLDS)
            for i, p in enumerate(patients)
        ]
    )
    omics_dir = root / "omics"
    omics_dir.mkdir()
    manifest.to_parquet(omics_dir / "manifest.parquet")
    feat.to_parquet(omics_dir / "features.parquet")
    splits.to_parquet(omics_dir / "splits.parquet")
    return omics_dir, features_dir


def write_config(path: Path, **training: object) -> Path:
    config = {
        "cohorts": {"TINY": {"demo": True}},
        "training": {
            "epochs": 3,
            "batch_size": 4,
            "grad_accumulation": 2,
            "max_patches_train": 16,
            "lr": 1e-3,
            "workers": 1,
            "ensemble": 1,  # one model per fold keeps these tests fast; the ensemble has its own test
            **training,
        },
        "healnet": {
            "n_latents": 8,
            "latent_dim": 32,
            "latent_heads": 2,
            "latent_dim_head": 16,
            "cross_dim_head": 16,
            "omic_token_dim": 8,
            "fourier_encode": True,
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("cohort")
    omics_dir, features_dir = make_cohort(root)
    return omics_dir, features_dir, write_config(root / "config.yaml")


def train_args(
    config: Path, omics_dir: Path, features_dir: Path, out: Path, model: str, *extra: str
) -> list[str]:
    return [
        "train",
        "--config",
        str(config),
        "--cohort",
        "TINY",
        "--model",
        model,
        "--omics-dir",
        str(omics_dir),
        "--features-dir",
        str(features_dir),
        "--models-dir",
        str(out / "models" / model),
        "--results-dir",
        str(out / "results" / model),
        "--threads",
        "1",
        "--device",
        DEVICE,
        *extra,
    ]


@pytest.fixture(scope="module")
def healnet_run(cohort: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    omics_dir, features_dir, config = cohort
    out = tmp_path_factory.mktemp("run")
    assert healnet_main(train_args(config, omics_dir, features_dir, out, "healnet")) == 0
    return out


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


def test_checkpoint_reproduces_the_saved_predictions(
    healnet_run: Path, cohort: tuple[Path, Path, Path]
) -> None:
    from preprocessing.omics.transforms import OmicTransform

    omics_dir, features_dir, _ = cohort
    model, ckpt = load_checkpoint(healnet_run / "models" / "healnet" / "fold1.pt")
    # the default screen keeps 8 of the 10 rna columns (cox score on the training fold) and all 5 cnv
    assert ckpt["wsi_dim"] == DIM and ckpt["fold"] == 1 and len(ckpt["feature_names"]) == 8 + 5
    transform = OmicTransform.from_state_dict(ckpt["omic_transform"])
    feats = pd.read_parquet(omics_dir / "features.parquet")
    preds = pd.read_parquet(healnet_run / "results" / "healnet" / "predictions.parquet")
    preds = preds.query("fold == 1 and setting == 'full'").set_index("patient")
    patient = next(p for p in preds.index if p in feats.index and p not in NO_WSI)
    x = transform.transform(feats.loc[[patient]]).loc[:, ckpt["feature_names"]].to_numpy(np.float32)
    stem = next(p for p in features_dir.iterdir() if p.name.startswith(patient))
    group = zarr.open_group(str(stem), mode="r")
    wsi = torch.from_numpy(np.asarray(group["features"][:], dtype=np.float32))[None]
    coords = torch.from_numpy(np.asarray(group["coords"][:], dtype=np.float32))[None]
    with torch.no_grad():
        logits = model(
            wsi, None, torch.from_numpy(x), torch.tensor([True]), torch.tensor([True]), wsi_coords=coords
        )
    risk = -torch.cumprod(1 - torch.sigmoid(logits), dim=-1).sum().item()
    assert risk == pytest.approx(preds.loc[patient, "risk"], abs=1e-4)
    assert ckpt["train_median_risk"] == pytest.approx(preds["train_median_risk"].iloc[0])


def test_a_damaged_checkpoint_is_a_one_line_error(healnet_run: Path, tmp_path: Path) -> None:
    # truncated by a full disk or an interrupted copy, or not a checkpoint at all
    whole = (healnet_run / "models" / "healnet" / "fold1.pt").read_bytes()
    for name, data in (("truncated.pt", whole[: len(whole) // 2]), ("junk.pt", b"junk")):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(InputError) as caught:
            load_checkpoint(path)
        message = str(caught.value)
        assert message.startswith(str(path)) and "cannot read checkpoint" in message
        assert len(message.splitlines()) == 1


def test_same_seed_same_c_index(cohort: tuple[Path, Path, Path], tmp_path: Path) -> None:
    omics_dir, features_dir, _ = cohort
    values, losses = [], []
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        # patch sampling (bags up to 39 patches, cap 16) and modality dropout both draw random numbers
        config = write_config(tmp_path / f"{run}.yaml", modality_dropout=0.5, seed=seed)
        out = tmp_path / run
        assert (
            healnet_main(train_args(config, omics_dir, features_dir, out, "perceiver", "--folds", "0")) == 0
        )
        folds = pd.read_csv(out / "results" / "perceiver" / "folds.csv")
        values.append(folds.query("setting == 'full'")["value"].round(4).tolist())
        log = json.loads((out / "results" / "perceiver" / "log.json").read_text())
        losses.append([e["train_loss"] for e in log["folds"][0]["epochs"]])
    assert values[0] == values[1] and losses[0] == losses[1]
    assert losses[0] != losses[2]  # another seed really changes the run


def test_weight_averaging_keeps_the_mean_of_the_last_epochs_weights(
    cohort: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    # the first epochs of a longer run are those of a shorter one (seeded per epoch), so the weights
    # averaged over epochs 2-3 of a 3-epoch run are the mean of a 2-epoch and a 3-epoch run's weights
    omics_dir, features_dir, _ = cohort

    def fold0(name: str, **settings: object) -> tuple[dict[str, torch.Tensor], dict]:
        config = write_config(tmp_path / f"{name}.yaml", modality_dropout=0.5, **settings)
        out = tmp_path / name
        assert healnet_main(train_args(config, omics_dir, features_dir, out, "healnet", "--folds", "0")) == 0
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


def fold0_outputs(
    config: Path, omics_dir: Path, features_dir: Path, out: Path, *extra: str
) -> tuple[tuple[pd.DataFrame, pd.DataFrame, list], dict]:
    """Train HEALNet's fold 0; its ``(folds.csv, predictions, per-epoch losses)`` and ``log.json``."""
    args = train_args(config, omics_dir, features_dir, out, "healnet", "--folds", "0", *extra)
    assert healnet_main(args) == 0
    results = out / "results" / "healnet"
    log = json.loads((results / "log.json").read_text())
    losses = [e.get("train_loss") for e in log["folds"][0]["epochs"]]
    return (pd.read_csv(results / "folds.csv"), pd.read_parquet(results / "predictions.parquet"), losses), log


def assert_same_outputs(outputs: list[tuple[pd.DataFrame, pd.DataFrame, list]]) -> None:
    for other in outputs[1:]:
        pd.testing.assert_frame_equal(other[0], outputs[0][0])
        pd.testing.assert_frame_equal(other[1], outputs[0][1])
        assert other[2] == outputs[0][2]


def count_store_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The paths healnet.data.stores reads stores at from now on (in this process)."""
    from healnet.data import stores as data

    reads: list[Path] = []
    read_store = data.read_store

    def counted(path: Path, *args: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
        reads.append(path)
        return read_store(path, *args, **kwargs)

    monkeypatch.setattr(data, "read_store", counted)
    return reads


def test_reader_count_leaves_the_numbers_unchanged(cohort: tuple[Path, Path, Path], tmp_path: Path) -> None:
    # training.workers is a run setting that Snakemake does not track, so it must not change results
    omics_dir, features_dir, _ = cohort
    outputs = []
    for workers in (0, 2):
        config = write_config(tmp_path / f"w{workers}.yaml", modality_dropout=0.5, workers=workers)
        output, log = fold0_outputs(config, omics_dir, features_dir, tmp_path / f"w{workers}")
        outputs.append(output)
    assert log["run"]["workers"] == 2 and "workers" not in log["training"]
    assert_same_outputs(outputs)


def test_decoded_feature_cache_reads_each_store_once_and_changes_no_number(
    cohort: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    omics_dir, features_dir, _ = cohort
    reads = count_store_reads(monkeypatch)
    cache = tmp_path / "cache"
    outputs = []
    for name, extra, workers in (("plain", (), 0), ("cached", ("--feature-cache", str(cache)), 0),
                                 ("cached-readers", ("--feature-cache", str(cache)), 2)):
        reads.clear()
        config = write_config(tmp_path / f"{name}.yaml", modality_dropout=0.5, workers=workers, epochs=3)
        output, log = fold0_outputs(config, omics_dir, features_dir, tmp_path / name, *extra)
        outputs.append(output)
        if name == "plain":
            assert len(reads) > len(set(reads))  # every epoch decodes its stores again
        elif workers == 0:
            assert sorted(reads) == sorted(set(reads))  # each store decoded once
        assert log["run"]["feature_cache"] == (str(cache) if extra else None)
    assert_same_outputs(outputs)
    assert cache.is_dir() and not any(cache.iterdir())  # each run's private folder is removed

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = write_config(tmp_path / "bad.yaml", workers=0)
    capsys.readouterr()
    bad = train_args(config, omics_dir, features_dir, tmp_path / "bad", "healnet", "--folds", "0",
                     "--feature-cache", str(blocker / "sub"))
    assert healnet_main(bad) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training.feature_cache: cannot make a folder in" in err[0]


def test_a_cache_that_cannot_be_written_costs_no_second_decoding(
    cohort: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from healnet.data.bags import BagDataset
    from healnet.data.stores import index_stores
    from preprocessing.omics.directory import load_omics_dir

    omics_dir, features_dir, _ = cohort
    manifest = load_omics_dir(omics_dir).manifest
    found, _ = index_stores(features_dir, manifest)
    bags = [found.get(p, []) for p in manifest["patient"]]
    row = next(i for i, b in enumerate(bags) if b)
    n = len(bags)

    def dataset(cache_dir: Path | None) -> BagDataset:
        return BagDataset(np.zeros((n, 1), np.float32), np.ones(n, bool), bags, np.zeros(n, int),
                          np.ones(n), np.ones(n), cache_dir=cache_dir)

    reads = count_store_reads(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    unwritable = dataset(blocker)  # no cache file can be made inside a file
    features, coords = unwritable.read_bag(row)
    assert len(reads) == len(bags[row])  # each store decoded once, not again after the failed write
    assert unwritable.cache_dir is None and "not used from here on" in caplog.text
    expected = dataset(None).read_bag(row)
    np.testing.assert_array_equal(features, expected[0])
    np.testing.assert_array_equal(coords, expected[1])


def test_bags_kept_on_the_device_change_no_number_and_are_read_when_they_do_not_fit(
    cohort: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    omics_dir, features_dir, _ = cohort
    outputs = []
    for name, setting, workers in (("read", "no", 0), ("kept", "yes", 0), ("kept-readers", "yes", 2),
                                   ("too-large", "yes", 0)):
        if name == "too-large":
            monkeypatch.setattr(memory, "free_memory", lambda device: 1000)
        config = write_config(tmp_path / f"{name}.yaml", modality_dropout=0.5, workers=workers, epochs=3)
        caplog.clear()
        output, log = fold0_outputs(config, omics_dir, features_dir, tmp_path / name,
                                    "--bags-on-device", setting)
        outputs.append(output)
        assert ("bags_on_device_seconds" in log["folds"][0]) == name.startswith("kept")
        assert ("read from the stores at every epoch instead" in caplog.text) == (name == "too-large")
    assert_same_outputs(outputs)


def test_a_job_ended_by_sigterm_removes_its_feature_cache_and_temporary_outputs(
    cohort: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """SIGTERM is how a cluster ends a job at its time limit; the decoded-feature cache (about 1.8x the
    stores) must not stay behind, which Python's default handling of SIGTERM would leave."""
    import signal
    import subprocess
    import sys
    import time

    omics_dir, features_dir, _ = cohort
    config = write_config(tmp_path / "long.yaml", workers=1, epochs=10_000)
    cache = tmp_path / "cache"
    args = train_args(config, omics_dir, features_dir, tmp_path, "abmil", "--folds", "0", "--feature-cache",
                      str(cache))
    job = subprocess.Popen([sys.executable, "-m", "healnet.cli", *args], stderr=subprocess.PIPE, text=True,
                           cwd=Path(__file__).resolve().parents[1])
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
    cohort: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    omics_dir, features_dir, _ = cohort
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "none.yaml", workers=0, epochs=1, feature_cache="none")
    assert healnet_main(train_args(config, omics_dir, features_dir, tmp_path / "out", "healnet",
                                   "--folds", "0")) == 0
    assert not (tmp_path / "none").exists()
    log = json.loads((tmp_path / "out" / "results" / "healnet" / "log.json").read_text())
    assert log["run"]["feature_cache"] is None  # recorded as the CLI's `--feature-cache none` is


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


@pytest.mark.parametrize("workers", [0, 1])
def test_bags_of_a_batch_are_padded_with_zeros_and_masked(workers: int) -> None:
    # A reader process builds its batch in shared memory, left uninitialised: the padding must be
    # written, since masked patches still pass through the model's matrix products (NaN * 0 = NaN).
    from healnet.data.bags import collate_bags

    rng = np.random.default_rng(0)
    bags = [rng.standard_normal((n, 5)).astype(np.float16) for n in (3, 7)] + [None]
    items = [{"row": i, "omics": np.zeros(2, np.float32), "has_omics": True, "has_wsi": b is not None,
              "bin": 0, "event": 1.0, "time": 1.0, "error": None, "wsi": b,
              "coords": None if b is None else np.full((len(b), 2), i + 1, np.float32)}
             for i, b in enumerate(bags)]
    loader = torch.utils.data.DataLoader(ListDataset(items), batch_size=3, collate_fn=collate_bags,
                                         num_workers=workers)
    for _ in range(2):  # the second batch of a worker may reuse the first one's memory
        batch = next(iter(loader))
        assert batch["wsi"].shape == (3, 7, 5) and batch["wsi"].dtype == torch.float16
        assert batch["wsi_mask"].sum(1).tolist() == [3, 7, 0]
        for i, b in enumerate(bags[:2]):
            assert torch.equal(batch["wsi"][i, : len(b)], torch.from_numpy(b))
            assert (batch["coords"][i, : len(b)] == i + 1).all()
        assert not batch["wsi"][0, 3:].any() and not batch["wsi"][2].any()
        assert not batch["coords"][0, 3:].any() and not batch["coords"][2].any()


@pytest.mark.parametrize("model", ["snn", "abmil", "late_fusion"])
def test_baselines_in_the_same_harness(cohort: tuple[Path, Path, Path], tmp_path: Path, model: str) -> None:
    omics_dir, features_dir, config = cohort
    assert healnet_main(train_args(config, omics_dir, features_dir, tmp_path, model, "--folds", "0,2")) == 0
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
    cohort: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    omics_dir, features_dir, _ = cohort
    config = write_config(
        tmp_path / "config.yaml", early_stopping=True, patience=1, epochs=4, inner_val_fraction=0.3
    )
    assert healnet_main(train_args(config, omics_dir, features_dir, tmp_path, "snn", "--folds", "1")) == 0
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
    history = loop.train_model(SNN(n_omics=5), dataset, np.arange(n_train), np.arange(n_train, n),
                               settings.training, torch.device("cpu"), 0, 0, None)
    epochs = [h for h in history if "epoch" in h]
    assert all(np.isnan(h["inner_val_c_index"]) for h in epochs)
    losses = [h["inner_val_nll"] for h in epochs]
    best = int(np.argmin(losses))
    assert history[-1] == {"restored_epoch": best, "inner_val_nll": losses[best]} and best > 0


def test_bags_kept_in_ram_are_copied_out_of_the_readers_shared_memory(
    cohort: tuple[Path, Path, Path]
) -> None:
    """On CPU, a kept bag that stayed a view of a reader's batch would hold that batch's shared-memory
    file descriptors open: two per patient, so a 500-patient fold hit the usual limit of 1,024."""
    from healnet.data.bags import BagDataset
    from healnet.data.resident import ResidentBags
    from healnet.data.stores import index_stores
    from preprocessing.omics.directory import load_omics_dir

    omics_dir, features_dir, _ = cohort
    manifest = load_omics_dir(omics_dir).manifest
    found, _ = index_stores(features_dir, manifest)
    bags = [found.get(p, []) for p in manifest["patient"]]
    n = len(bags)
    dataset = BagDataset(np.zeros((n, 1), np.float32), np.ones(n, bool), bags, np.zeros(n, int),
                         np.ones(n), np.ones(n))
    kept = ResidentBags(dataset, range(n), torch.device("cpu"), workers=1)
    assert kept.features and not any(t.is_shared() for t in [*kept.features.values(), *kept.coords.values()])
    row = next(iter(kept.features))
    np.testing.assert_array_equal(kept.features[row].numpy(), dataset.read_bag(row)[0])


def test_without_feature_stores(
    cohort: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    omics_dir, _, config = cohort
    empty = tmp_path / "no_features"
    empty.mkdir()
    assert healnet_main(train_args(config, omics_dir, empty, tmp_path, "abmil")) == 1
    assert "needs WSI features" in capsys.readouterr().err
    assert healnet_main(train_args(config, omics_dir, empty, tmp_path, "healnet", "--folds", "0")) == 0
    log = json.loads((tmp_path / "results" / "healnet" / "log.json").read_text())
    assert any("trained on omics alone" in note for note in log["notes"])
    folds = pd.read_csv(tmp_path / "results" / "healnet" / "folds.csv")
    assert set(folds["setting"]) == {"full"}


def test_bad_inputs_are_one_line_errors(
    cohort: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    omics_dir, features_dir, config = cohort
    assert healnet_main(train_args(config, tmp_path / "nowhere", features_dir, tmp_path, "snn")) == 1
    assert "omics folder does not exist" in capsys.readouterr().err
    assert healnet_main(train_args(config, omics_dir, features_dir, tmp_path, "snn", "--folds", "7")) == 1
    assert "fold(s) [7] not in splits.parquet" in capsys.readouterr().err
    broken = tmp_path / "features"
    broken.mkdir()
    stem = next(features_dir.iterdir()).name
    write_store(broken / stem, np.zeros((3, DIM)), np.zeros((3, 2)), complete=False)
    assert healnet_main(train_args(config, omics_dir, broken, tmp_path, "abmil")) == 1
    err = capsys.readouterr().err
    assert stem in err and "not marked complete" in err and len(err.strip().splitlines()) == 1
    assert "delete the store and rerun extraction" in err
    # a chunk file gone (a partial copy): zarr would read zeros
    shutil.rmtree(broken / stem)
    shutil.copytree(features_dir / stem, broken / stem)
    (broken / stem / "features" / "c" / "0" / "0").unlink()
    assert healnet_main(train_args(config, omics_dir, broken, tmp_path, "abmil")) == 1
    err = capsys.readouterr().err
    assert stem in err and "1 of 1 feature chunks are missing" in err and len(err.strip().splitlines()) == 1
    # metadata that is no longer JSON (a half-copied store) gets the same advice
    shutil.rmtree(broken / stem)
    shutil.copytree(features_dir / stem, broken / stem)
    (broken / stem / "zarr.json").write_text("{oops")
    assert healnet_main(train_args(config, omics_dir, broken, tmp_path, "abmil")) == 1
    err = capsys.readouterr().err
    assert stem in err and "not a readable feature store" in err and len(err.strip().splitlines()) == 1
    assert "delete the store and rerun extraction" in err
    # an infinite omic value (healnet omics refuses them; a table edited by hand) would give NaN risks
    edited = tmp_path / "omics_edited"
    shutil.copytree(omics_dir, edited)
    table = pd.read_parquet(edited / "features.parquet")
    table.iloc[0, 1] = np.inf
    table.to_parquet(edited / "features.parquet")
    assert healnet_main(train_args(config, edited, features_dir, tmp_path, "snn")) == 1
    err = capsys.readouterr().err
    assert "features.parquet: 1 infinite value(s), first" in err and len(err.strip().splitlines()) == 1


def test_a_fold_removes_the_temporaries_killed_saves_left(
    cohort: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """A job killed while saving leaves a hidden temporary state file (as large as the model); the
    fold's next run deletes its own, and leaves another fold's and a live writer's alone."""
    omics_dir, features_dir, config = cohort
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
    assert healnet_main(train_args(config, omics_dir, features_dir, tmp_path, "snn", "--folds", "0")) == 0
    assert {name: (models / name).exists() for name in names} == names
    assert (models / "fold0.pt").exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_damaged_feature_store_is_a_one_line_error(
    cohort: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: int
) -> None:
    # a chunk that no longer decodes (disk or copy damage), read in the main process or in a reader
    omics_dir, features_dir, _ = cohort
    damaged = tmp_path / "features"
    shutil.copytree(features_dir, damaged)
    store = sorted(damaged.iterdir())[0]
    (store / "features" / "c" / "0" / "0").write_bytes(b"not a zstd frame")
    config = write_config(tmp_path / "c.yaml", workers=workers)
    assert healnet_main(train_args(config, omics_dir, damaged, tmp_path, "abmil", "--folds", "0")) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert store.name in err and "delete the store and rerun extraction" in err
    assert not (tmp_path / "results" / "abmil" / "folds.csv").exists()
    # the report's heatmap reader says the same
    with pytest.raises(InputError, match="delete the store and rerun extraction"):
        explain.read_bag(damaged, [store.name.removesuffix(".zarr")])


def test_evaluate_summarises_every_model(healnet_run: Path, cohort: tuple[Path, Path, Path]) -> None:
    omics_dir, features_dir, config = cohort
    assert healnet_main(train_args(config, omics_dir, features_dir, healnet_run, "snn")) == 0
    out = healnet_run / "results" / "summary.csv"
    assert (
        evaluate.cli(
            [
                "--cohort",
                "TINY",
                "--results-dir",
                str(healnet_run / "results"),
                "--models",
                "healnet,snn",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    summary = pd.read_csv(out)
    assert list(summary[["model", "setting"]].itertuples(index=False, name=None))[:2] in (
        [("healnet", "full"), ("snn", "full")],
        [("snn", "full"), ("healnet", "full")],
    )
    assert len(summary) == 5 and (summary["n_folds"] == 3).all()
    folds = pd.read_csv(healnet_run / "results" / "snn" / "folds.csv").query("metric == 'c_index'")
    row = summary.set_index(["model", "setting"]).loc[("snn", "full")]
    assert row["c_index_mean"] == pytest.approx(folds["value"].mean())
    assert row["c_index_folds"] == ";".join(f"{v:.4f}" for v in folds.sort_values("fold")["value"])
    md = out.with_suffix(".md").read_text()
    assert "| healnet | full |" in md and "±" in md
    # HEALNet against the SNN fold by fold: mean and spread of the per-fold differences, folds won.
    healnet_c = pd.read_csv(healnet_run / "results" / "healnet" / "folds.csv").query(
        "metric == 'c_index' and setting == 'full'"
    )
    diff = healnet_c.set_index("fold")["value"] - folds.query("setting == 'full'").set_index("fold")["value"]
    spread = f"{diff.mean():+.3f} ± {diff.std(ddof=0):.3f}"
    tied = f" ({(diff == 0).sum()} tied)" if (diff == 0).any() else ""
    assert f"| healnet | snn (best unimodal) | {spread} | {(diff > 0).sum()} of 3{tied} |" in md
    # The same tables as a self-contained HTML page (the Snakemake report shows it in the page).
    page = out.with_suffix(".html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page
    assert page.count("<tr") == len(summary) + 1 + 2 and "<td>healnet</td><td>full</td>" in page
    assert "<td>healnet</td><td>snn (best unimodal)</td>" in page
    snn = summary.set_index(["model", "setting"]).loc[("snn", "full")]
    assert f"{snn['c_index_mean']:.3f} ± {snn['c_index_std']:.3f}" in page
    assert (
        healnet_main(
            [
                "evaluate",
                "--cohort",
                "TINY",
                "--results-dir",
                str(healnet_run / "results"),
                "--models",
                "healnet,perceiver",
                "-o",
                str(out),
            ]
        )
        == 1
    )  # perceiver never trained
    assert pd.read_csv(out).equals(summary)  # the old summary is left untouched


def test_the_report_draws_only_the_models_it_is_given(
    healnet_run: Path, cohort: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model dropped from `models:` leaves its results folder behind; the report (which the
    workflow gives the configured models) must not plot it, nor read a left-over HEALNet."""
    from healnet.report import cli as report

    omics_dir, features_dir, config = cohort
    results = healnet_run / "results"
    if not (results / "snn" / "predictions.parquet").exists():
        assert healnet_main(train_args(config, omics_dir, features_dir, healnet_run, "snn")) == 0
    attention_from: list[Path | None] = []
    monkeypatch.setattr(explain, "draw_attention_figures",
                        lambda models_dir, **kwargs: attention_from.append(models_dir))
    args = ["--cohort", "TINY", "--results-dir", str(results), "--omics-dir", str(omics_dir),
            "--models-dir", str(healnet_run / "models"), "--features-dir", str(features_dir),
            "--tiles-dir", str(tmp_path / "tiles"), "-o", str(tmp_path / "figures")]
    assert report.cli([*args, "--models", "snn"]) == 0
    assert set(pd.read_csv(results / "logrank.csv")["model"]) == {"snn"}
    assert attention_from == [None]
    assert report.cli(args) == 0  # no --models: every model with results
    assert set(pd.read_csv(results / "logrank.csv")["model"]) == {"healnet", "snn"}
    assert attention_from[-1] == healnet_run / "models" / "healnet"


def test_failed_slides_lists_a_slide_whose_extraction_was_recorded_as_failed(tmp_path: Path) -> None:
    from healnet.report.figures import failed_slides
    from preprocessing.tiling.tiles import write_tiles

    grid = pd.DataFrame({"x": [0, 256], "y": [0, 0], "tissue_fraction": [1.0, 1.0]})
    for stem in ("TCGA-AA-0001-01Z-00-DX1", "TCGA-AA-0002-01Z-00-DX1"):
        write_tiles(tmp_path / "tiles" / f"{stem}.parquet", grid, {"level": 0})
        store = zarr.open_group(str(tmp_path / "features" / f"{stem}.zarr"), mode="w")
        if stem.startswith("TCGA-AA-0002"):
            store.attrs["failed"] = "more than 1.00% of 2 patches cannot be decoded; first at x=0, y=0"
    table = failed_slides(tmp_path / "tiles", tmp_path / "features")
    assert table.to_dict("records") == [{
        "slide": "TCGA-AA-0002-01Z-00-DX1", "patient": "TCGA-AA-0002", "status": "failed",
        "reason": "more than 1.00% of 2 patches cannot be decoded; first at x=0, y=0"}]
    assert failed_slides(tmp_path / "tiles").empty  # without the stores, tiling saw nothing wrong
    # a slide no longer in the slides folder is not listed, although its tiles file is still there
    assert failed_slides(tmp_path / "tiles", tmp_path / "features", {"TCGA-AA-0001-01Z-00-DX1"}).empty
    # a damaged tiles file is a failed slide with its reason, as in the omics step, not a crash
    (tmp_path / "tiles" / "TCGA-AA-0001-01Z-00-DX1.parquet").write_bytes(b"PAR1 cut short")
    table = failed_slides(tmp_path / "tiles", tmp_path / "features")
    assert list(table["status"]) == ["failed", "failed"]
    assert table["reason"].iloc[0].startswith("tiles file unreadable (")


def test_the_report_names_an_unreadable_predictions_file(tmp_path: Path) -> None:
    from healnet.report.figures import load_predictions

    (tmp_path / "snn").mkdir()
    (tmp_path / "snn" / "predictions.parquet").write_bytes(b"PAR1 cut short")
    with pytest.raises(InputError, match=r"snn/predictions.parquet: cannot read predictions \(.*retrain"):
        load_predictions(tmp_path, ["snn"])


def test_kaplan_meier_groups_hold_only_patients_the_model_scored(tmp_path: Path) -> None:
    """A patient without any modality the model reads got the training median as a stand-in risk;
    counted in the low-risk group it would bend that curve and the log-rank test."""
    from healnet.report.figures import plot_km_curves

    rng = np.random.default_rng(0)
    n = 30
    preds = pd.DataFrame({"model": "snn", "setting": "full", "risk": rng.normal(size=n),
                          "train_median_risk": 0.0, "time": rng.uniform(1, 50, n),
                          "event": rng.integers(0, 2, n), "imputed": np.arange(n) < 6})
    preds.loc[preds["imputed"], "risk"] = 0.0
    table = plot_km_curves(preds, tmp_path / "km.png").iloc[0]
    scored = preds[~preds["imputed"]]
    assert (table["n_high"], table["n_low"], table["n_unscored"]) == (
        int((scored["risk"] > 0).sum()), int((scored["risk"] <= 0).sum()), 6)


def test_the_attention_figure_draws_one_slide_per_chosen_patient_in_risk_order() -> None:
    """Panels arrive per slide in fold order; a patient with two slides in the first fold must not
    push the lowest-risk patient out of the figure."""
    def panel(patient: str, slide: str, n_patches: int) -> dict:
        return {"patient": patient, "slide": slide, "coords": np.zeros((n_patches, 2))}

    panels = [panel("A", "A1", 5), panel("A", "A2", 9), panel("B", "B1", 4), panel("C", "C1", 3),
              panel("D", "D1", 7)]
    wanted = {"A": "highest predicted risk", "D": "lowest predicted risk", "C": "highest predicted risk"}
    drawn = explain.one_panel_per_patient(panels, wanted, 3)
    assert [p["slide"] for p in drawn] == ["A2", "D1", "C1"]
    assert [p["slide"] for p in explain.one_panel_per_patient(panels, wanted, 2)] == ["A2", "D1"]


def test_paired_differences_compare_fusion_with_each_unimodal_model_fold_by_fold() -> None:
    values = {  # c-index per fold; fold 2 of abmil undefined (no comparable pair)
        "healnet": [0.70, 0.60, 0.80],
        "abmil": [0.65, 0.70, float("nan")],
        "snn": [0.50, 0.60, 0.60],  # fold 1: the same c-index as healnet, a tie
        "my_model": [0.9, 0.9, 0.9],  # not a harness model: skipped
    }
    rows = [
        {"model": m, "fold": f, "setting": s, "metric": "c_index", "value": v - (s != "full") * 0.2}
        for m, vs in values.items()
        for f, v in enumerate(vs)
        for s in ("full", "omics_only")
    ]
    paired = evaluate.paired_differences(pd.DataFrame(rows)).set_index("baseline")
    assert list(paired["model"]) == ["healnet", "healnet"] and paired.index[0] == "abmil"
    assert paired.loc["abmil", "best_baseline"] and not paired.loc["snn", "best_baseline"]  # 0.675 > 0.55
    assert paired.loc["abmil", "n_folds"] == 2 and paired.loc["abmil", "wins"] == 1
    assert paired.loc["abmil", "mean_difference"] == pytest.approx(((0.70 - 0.65) + (0.60 - 0.70)) / 2)
    assert paired.loc["snn", "mean_difference"] == pytest.approx(0.4 / 3)
    assert paired.loc["snn", "std_difference"] == pytest.approx(np.std([0.20, 0.0, 0.20]))
    assert (paired.loc["snn", "wins"], paired.loc["snn", "ties"], paired.loc["abmil", "ties"]) == (2, 1, 0)
    cells = {row["baseline"]: evaluate.paired_cells(row)[-1] for _, row in paired.reset_index().iterrows()}
    assert cells == {"snn": "2 of 3 (1 tied)", "abmil": "1 of 2"}
    assert evaluate.paired_differences(pd.DataFrame(rows).query("model == 'snn'")).empty


def test_a_mean_over_fewer_folds_says_so() -> None:
    """A fold without a comparable pair has no c-index; the table must not present the mean of the
    other folds as if it covered them all."""
    rows = [{"model": "snn", "fold": f, "setting": "full", "metric": m, "value": v}
            for f, v in enumerate([0.6, float("nan"), 0.8]) for m in ("c_index", "ibs")]
    row = evaluate.summarise(pd.DataFrame(rows)).iloc[0]
    assert (row["c_index_n"], row["n_folds"]) == (2, 3) and row["c_index_mean"] == pytest.approx(0.7)
    cells = evaluate.summary_cells(row)
    assert cells[2] == "0.700 ± 0.100 (2 of 3 folds)" and cells[3] == "n/a"


def test_folds_trained_as_separate_runs_collect_into_the_all_fold_outputs(
    healnet_run: Path, cohort: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The workflow trains each fold as its own job; joined, they equal one all-fold run."""
    omics_dir, features_dir, config = cohort
    model_dir = tmp_path / "results" / "healnet"
    for k in (0, 1, 2):
        args = train_args(config, omics_dir, features_dir, tmp_path, "healnet", "--folds", str(k))
        args[args.index("--results-dir") + 1] = str(model_dir / f"fold{k}")
        assert healnet_main(args) == 0
    assert healnet_main(["collect", "--results-dir", str(model_dir), "--folds", "0,1,2"]) == 0
    whole = healnet_run / "results" / "healnet"
    assert pd.read_csv(model_dir / "folds.csv").equals(pd.read_csv(whole / "folds.csv"))
    predictions = pd.read_parquet(model_dir / "predictions.parquet")
    assert predictions.equals(pd.read_parquet(whole / "predictions.parquet"))
    log = json.loads((model_dir / "log.json").read_text())
    assert [f["fold"] for f in log["folds"]] == [0, 1, 2] and log["model"] == "healnet"
    # A fold folder holding another fold's results, or a missing fold, is one clear line and no output.
    (model_dir / "folds.csv").unlink()
    shutil.copytree(model_dir / "fold0", model_dir / "fold3")
    capsys.readouterr()
    assert healnet_main(["collect", "--results-dir", str(model_dir), "--folds", "0,3"]) == 1
    err = capsys.readouterr().err
    assert "fold3" in err and "expected only fold 3" in err and len(err.strip().splitlines()) == 1
    assert healnet_main(["collect", "--results-dir", str(model_dir), "--folds", "0,4"]) == 1
    assert "train fold 4 first" in capsys.readouterr().err
    assert not (model_dir / "folds.csv").exists()
    # a fold rerun by hand with another learning rate is not joined with the others (another thread
    # count would be: it changes only how fast a fold trains)
    shutil.rmtree(model_dir / "fold3")
    fold1 = model_dir / "fold1" / "log.json"
    log1 = json.loads(fold1.read_text())
    fold1.write_text(json.dumps({**log1, "run": {**log1["run"], "threads": 7, "device": "cuda"}}))
    assert healnet_main(["collect", "--results-dir", str(model_dir), "--folds", "0,1,2"]) == 0
    fold1.write_text(json.dumps({**log1, "training": {**log1["training"], "lr": 0.5}}))
    capsys.readouterr()
    assert healnet_main(["collect", "--results-dir", str(model_dir), "--folds", "0,1,2"]) == 1
    assert "fold1: another run than fold 0: different training settings; retrain" in capsys.readouterr().err
    assert healnet_main(["collect", "--results-dir", str(model_dir), "--folds", "0,0,2"]) == 1
    assert "a fold is named twice" in capsys.readouterr().err
    # hand-edited fold files: one line each, and the joined outputs of a good collect stay as they were
    fold1.write_text(json.dumps(log1))
    assert healnet_main(["collect", "--results-dir", str(model_dir), "--folds", "0,1,2"]) == 0
    joined = (model_dir / "folds.csv").read_bytes()
    metrics1 = model_dir / "fold1" / "folds.csv"
    good = metrics1.read_text()
    broken = pd.read_csv(metrics1).astype({"value": object})
    broken.loc[0, "value"] = "x"
    for bad_file, text, said in [
        (metrics1, broken.to_csv(index=False), "column 'value' holds 'x' (row 2), not a number"),
        (metrics1, good[:20], "missing columns"),
        (fold1, "[1, 2]", "not a training log"),
        (fold1, json.dumps({**log1, "seconds": "abc"}), "not a training log"),
    ]:
        original = bad_file.read_text()
        bad_file.write_text(text)
        capsys.readouterr()
        assert healnet_main(["collect", "--results-dir", str(model_dir), "--folds", "0,1,2"]) == 1
        err = capsys.readouterr().err
        assert said in err and str(bad_file) in err and len(err.strip().splitlines()) == 1
        bad_file.write_text(original)
    assert (model_dir / "folds.csv").read_bytes() == joined
    # healnet evaluate reads the joined table the same way
    (model_dir / "folds.csv").write_text(broken.to_csv(index=False))
    assert healnet_main(["evaluate", "--cohort", "C", "--results-dir", str(tmp_path / "results"),
                         "--models", "healnet", "-o", str(tmp_path / "summary.csv")]) == 1
    err = capsys.readouterr().err
    assert "column 'value' holds 'x'" in err and len(err.strip().splitlines()) == 1


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


@pytest.mark.parametrize("early_stopping", [False, True])
def test_a_killed_fold_resumes_where_it_saved_and_gives_the_same_numbers(
    cohort: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, early_stopping: bool
) -> None:
    omics_dir, features_dir, _ = cohort
    # 4 epochs of 4 steps (fold 0 trains 16 patients, 4 per step); patience 9 so that none stops early
    # killed while the last 3 epochs' weights are being averaged: the partial average must be kept
    settings = {"epochs": 4, "modality_dropout": 0.5, "early_stopping": early_stopping, "patience": 9,
                "save_state_minutes": 0, "workers": 0, "average_last_epochs": 3}
    config = write_config(tmp_path / "c.yaml", **settings)
    steps = count_training_steps(monkeypatch)

    def run(name: str, config: Path = config) -> tuple[pd.DataFrame, pd.DataFrame, dict, dict]:
        out = tmp_path / name
        assert healnet_main(train_args(config, omics_dir, features_dir, out, "healnet", "--folds", "0")) == 0
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
    other = write_config(tmp_path / "other.yaml", **settings, lr=2e-3)
    changed = run("changed", other)
    assert steps["n"] == 4 * per_epoch and not any(e.get("resumed") for e in changed[2]["epochs"])


def test_a_seed_ensemble_fold_keeps_every_member_and_a_kill_loses_only_the_unfinished_one(
    cohort: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    omics_dir, features_dir, _ = cohort
    settings = {"epochs": 3, "modality_dropout": 0.5, "save_state_minutes": 0, "workers": 0}
    steps = count_training_steps(monkeypatch)

    def run(name: str, members: int, seed: int = 0) -> tuple[tuple[pd.DataFrame, pd.DataFrame, list], Path]:
        config = write_config(tmp_path / f"{members}-{seed}.yaml", **settings, ensemble=members, seed=seed)
        output, _ = fold0_outputs(config, omics_dir, features_dir, tmp_path / name)
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


def test_an_ensemble_keeps_its_bags_on_the_device_once_for_all_members(
    cohort: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    omics_dir, features_dir, _ = cohort
    reads = count_store_reads(monkeypatch)
    counts = []
    for members in (1, 2):
        config = write_config(tmp_path / f"{members}.yaml", workers=0, epochs=2, ensemble=members)
        reads.clear()
        out = tmp_path / str(members)
        _, log = fold0_outputs(config, omics_dir, features_dir, out, "--bags-on-device", "yes")
        assert "bags_on_device_seconds" in log["folds"][0]
        counts.append(len(reads))
    assert counts[0] == counts[1]  # a second member reads no store again
