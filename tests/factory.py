"""Small cohorts for tests, written with the production writers.

A cohort is an omics folder (``manifest.parquet``, ``features.parquet``, ``splits.parquet``,
``summary.json``, written by :func:`preprocessing.omics.directory.write_omics_dir`) and a folder of
per-slide feature stores (written by :func:`preprocessing.features.store.write_store`, the writer
extraction uses, with the features of a stub encoder). A planted risk ``z`` per patient sets its
survival time and shows in a few omic genes and in some patches of its slide, so a model that learns
can rank the patients, and the planted risk itself bounds how well it can.

:func:`training_cohort` is the small cohort of the training tests (every kind of missing input), and
:func:`shared_cohort` / :func:`shared_run` give one copy of it, and one trained run per model, to
every test module of a pytest session.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
import zarr

from preprocessing.features.store import write_store
from preprocessing.omics.directory import write_omics_dir

#: what a stub encoder writes into a store's attributes (the keys extraction records)
STUB_ENCODER = {"encoder": "stub", "weights": "random", "weights_sha256": None, "dtype": "float16"}
#: the device of the tests' ``healnet train`` calls; ``HEALNET_TEST_DEVICE=cuda`` runs them on a GPU
TEST_DEVICE = os.environ.get("HEALNET_TEST_DEVICE", "cpu")


@dataclass(frozen=True)
class Cohort:
    """A written test cohort: its folders, the planted risk and the survival labels by patient."""

    root: Path
    omics_dir: Path
    features_dir: Path
    manifest: pd.DataFrame  # as written: patient, time, event, slides, has_wsi, has_omics
    risk: pd.Series  # the planted risk z by patient (higher: shorter survival)
    n_folds: int

    @property
    def patients(self) -> list[str]:
        return list(self.manifest["patient"])


def patient_ids(n: int, site: str = "AA") -> list[str]:
    """``TCGA-<site>-0000`` ... : TCGA-style patient barcodes."""
    return [f"TCGA-{site}-{i:04d}" for i in range(n)]


def slide_stem(patient: str, i: int) -> str:
    """A TCGA-style diagnostic slide name for ``patient`` (unique by ``i``)."""
    return f"{patient}-01Z-00-DX1.{i:08X}"


def write_feature_store(path: Path, features: np.ndarray, coords: np.ndarray, **attrs: Any) -> Path:
    """One slide's feature store (float16 rows, as extraction writes them) by the production writer."""
    write_store(path, np.asarray(features, dtype=np.float16), coords, {**STUB_ENCODER, **attrs})
    return path


def round_robin_splits(patients: list[str], n_folds: int) -> pd.DataFrame:
    """``splits.parquet``'s table: patient ``i`` is held out (role ``val``) in fold ``i % n_folds``."""
    return pd.DataFrame([{"fold": k, "patient": p, "role": "val" if i % n_folds == k else "train"}
                         for k in range(n_folds) for i, p in enumerate(patients)])


def survival(z: np.ndarray, rng: np.random.Generator, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """Log-normal survival times in months whose median falls with the risk ``z``, and random
    right-censoring (about a quarter of the patients); returns ``(time, event)``."""
    death = 30.0 * np.exp(-z + noise * rng.normal(size=len(z)))
    censor = rng.uniform(20.0, 150.0, size=len(z))
    return np.minimum(death, censor).round(3), (death <= censor).astype(int)


def planted_cohort(root: Path, n_patients: int = 24, n_folds: int = 3, dim: int = 16, seed: int = 0,
                   no_wsi: Collection[str] = (), no_omics: Collection[str] = (), noise: float = 0.5,
                   patches: tuple[int, int] = (10, 40), empty_stores: Collection[str] = (),
                   unextracted: Collection[str] = (),
                   missing_values: Collection[tuple[str, str]] = ()) -> Cohort:
    """Write a cohort whose survival follows a planted risk ``z ~ N(0, 1)``.

    Omics: ``rna:G0``..``rna:G9`` (the first three are ``z`` plus noise) and ``cnv:C0``..``cnv:C4``
    (noise); slides: ``patches`` rows per store, a third of them carrying ``z`` in their first four
    dimensions. Patients in ``no_wsi`` have no slide, those in ``no_omics`` no omic row. The slides of
    patients in ``empty_stores`` have a store without patches, those in ``unextracted`` are listed in
    the manifest but have no store (never extracted); ``missing_values`` are ``(patient, column)`` omic
    cells left NaN (imputed per fold). None of the three changes the random draws of the others.
    """
    rng = np.random.default_rng(seed)
    patients = patient_ids(n_patients)
    z = rng.normal(size=n_patients)
    time, event = survival(z, rng, noise)
    features_dir, omics_dir = root / "features", root / "omics"
    features_dir.mkdir(parents=True, exist_ok=True)
    slides: list[list[str]] = []
    for i, patient in enumerate(patients):
        if patient in no_wsi:
            slides.append([])
            continue
        n = int(rng.integers(*patches))
        feats = rng.normal(size=(n, dim))
        feats[rng.random(n) < 1 / 3, :4] += z[i]
        cells = rng.permutation(400)[:n]  # distinct places on a 20 x 20 grid of 256-px patches
        coords = np.c_[cells % 20, cells // 20] * 256
        if patient in empty_stores:
            feats, coords = feats[:0], coords[:0]
        if patient not in unextracted:
            write_feature_store(features_dir / f"{slide_stem(patient, i)}.zarr", feats, coords)
        slides.append([slide_stem(patient, i)])
    manifest = pd.DataFrame({"patient": patients, "time": time, "event": event, "slides": slides,
                             "has_wsi": [bool(s) for s in slides],
                             "has_omics": [p not in no_omics for p in patients]})
    rna = rng.normal(size=(n_patients, 10)) + np.outer(z, np.r_[np.ones(3), np.zeros(7)])
    cnv = rng.integers(-2, 3, size=(n_patients, 5)).astype(float)
    omics = pd.DataFrame(np.c_[rna, cnv], index=pd.Index(patients, name="patient"),
                         columns=[f"rna:G{j}" for j in range(10)] + [f"cnv:C{j}" for j in range(5)])
    for patient, column in missing_values:
        omics.loc[patient, column] = np.nan
    omics = omics.drop(index=sorted(no_omics))
    write_omics_tables(omics_dir, manifest, omics, round_robin_splits(patients, n_folds))
    return Cohort(root, omics_dir, features_dir, manifest, pd.Series(z, index=patients, name="z"), n_folds)


def write_omics_tables(omics_dir: Path, manifest: pd.DataFrame, omics: pd.DataFrame,
                       splits: pd.DataFrame) -> Path:
    """An omics folder as ``healnet omics`` writes it, with a summary that counts what it holds."""
    summary = {"patients": len(manifest), "patients_with_omics": len(omics),
               "folds": int(splits["fold"].nunique()), "made_by": "tests/factory.py"}
    write_omics_dir(omics_dir, manifest, omics, splits, summary)
    return omics_dir


def write_config(path: Path, training: Mapping[str, Any] | None = None,
                 healnet: Mapping[str, Any] | None = None) -> Path:
    """A config.yaml for a tiny cohort ``TINY``: small, fast models; ``training``/``healnet`` override."""
    config = {
        "cohorts": {"TINY": {"demo": True}},
        "training": {"epochs": 3, "batch_size": 4, "grad_accumulation": 2, "max_patches_train": 16,
                     "lr": 1e-3, "workers": 1, "ensemble": 1, **(training or {})},
        "healnet": {"n_latents": 8, "latent_dim": 32, "latent_heads": 2, "latent_dim_head": 16,
                    "cross_dim_head": 16, "omic_token_dim": 8, "fourier_encode": True, **(healnet or {})},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def train_args(cohort: Cohort, config: Path, model: str, out: Path, *extra: str, workers: int | None = 0,
               device: str = TEST_DEVICE, results: Path | None = None) -> list[str]:
    """The arguments of ``healnet train`` for one model of ``cohort`` (cohort ``TINY``), one torch
    thread, into ``out/models/<model>`` and ``out/results/<model>`` (or ``results``). ``workers``:
    processes reading bags (0: this process; None: the config's ``training.workers``)."""
    args = ["train", "--config", str(config), "--cohort", "TINY", "--model", model,
            "--omics-dir", str(cohort.omics_dir), "--features-dir", str(cohort.features_dir),
            "--models-dir", str(out / "models" / model),
            "--results-dir", str(results or out / "results" / model),
            "--device", device, "--threads", "1"]
    return [*args, *([] if workers is None else ["--workers", str(workers)]), *extra]


def train(cohort: Cohort, config: Path, model: str, out: Path, *extra: str, workers: int | None = 0,
          device: str = TEST_DEVICE, results: Path | None = None) -> int:
    """``healnet train`` of one model in this process (see :func:`train_args`; by default on
    :data:`TEST_DEVICE`, the CPU unless set otherwise, with the bags read in this process); torch's
    thread count is restored after."""
    import torch

    from healnet.cli import main

    threads = torch.get_num_threads()
    try:
        return main(train_args(cohort, config, model, out, *extra, workers=workers, device=device,
                               results=results))
    finally:
        torch.set_num_threads(threads)


#: the small 40x slide of :func:`small_40x_slide`: levels of 500 x 375 and 125 x 94 px (downsample 15.98)
SMALL_40X = (2000, 1500)


def small_40x_slide(path: Path) -> Path:
    """A small 40x Aperio slide for the slide readers' tests: an H&E-like texture with grain, YCbCr
    JPEG tiles of 256 px, three levels, padded edge tiles."""
    import cv2
    import skimage.data

    from preprocessing.demo.svs_writer import write_svs_from_array

    width, height = SMALL_40X
    image = cv2.resize(skimage.data.immunohistochemistry(), (width, height), interpolation=cv2.INTER_CUBIC)
    rng = np.random.default_rng(0)
    grain = cv2.GaussianBlur(rng.normal(0, 12, (height, width)).astype(np.float32), (0, 0), 1.5)
    image = np.clip(image + grain[..., None], 0, 255).astype(np.uint8)
    return write_svs_from_array(path, image, mpp=0.25, app_mag=40)


def small_40x_grid(path: Path) -> Path:
    """A tiles file of six 512-px level-0 patches (256 px at 0.5 um/px) on :func:`small_40x_slide`."""
    from preprocessing.tiling.tiles import write_tiles

    ys, xs = np.mgrid[0:1024:512, 0:1536:512]
    return write_tiles(path, pd.DataFrame({"x": xs.ravel(), "y": ys.ravel(), "tissue_fraction": 1.0}),
                       {"slide": "slide", "level": 0, "downsample": 1.0, "patch_size_level0": 512,
                        "patch_size": 256, "target_mpp": 0.5, "mpp": 0.25, "mpp_source": "aperio"})


def mean_colour_encoder() -> Any:
    """A 3-d encoder that returns each patch's mean colour at 32 px: extraction without a network."""
    from torch import nn

    from preprocessing.features.encoders import Encoder

    class MeanColour(nn.Module):
        def forward(self, x: Any) -> Any:
            return x.mean(dim=(2, 3))

    return Encoder("mean", MeanColour(), 3, (32, 32), (0.5,) * 3, (0.5,) * 3, "bilinear", "random", None)


def damage_tile(src: Path, dest: Path, index: int) -> Path:
    """Copy of the slide ``src`` with the bytes of level-0 tile ``index`` zeroed (a tile no decoder can
    read, as a bad sector or a cut copy leaves it)."""
    import tifffile

    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        offset, size = tif.pages[0].dataoffsets[index], tif.pages[0].databytecounts[index]
    data[offset:offset + size] = bytes(size)
    dest.write_bytes(bytes(data))
    return dest


GRID = 256  # the planted cohort's patches: a 20 x 20 grid of 256-px cells at level 0


def write_trident(path: Path, features: np.ndarray, coords: np.ndarray, *, encoder: str | None = "stub",
                  patch_size_level0: int = GRID, **coords_attrs: object) -> Path:
    """A feature file laid out as TRIDENT's ``extract_patch_features`` writes it (its text ``None``
    for a missing encoder included)."""
    with h5py.File(path, "w") as f:
        feats = f.create_dataset("features", data=features)
        feats.attrs.update({"name": path.stem, "savetodir": str(path.parent),
                            "encoder": "None" if encoder is None else encoder})
        xy = f.create_dataset("coords", data=coords.astype(np.int64))
        xy.attrs.update({"patch_size": GRID, "patch_size_level0": patch_size_level0,
                         "level0_magnification": 20, "target_magnification": 20, "overlap": 0,
                         "name": path.stem, "savetodir": str(path.parent), "level0_width": 20 * GRID,
                         "level0_height": 20 * GRID, **coords_attrs})
    return path


def write_clam(path: Path, features: np.ndarray, coords: np.ndarray, attrs: bool = True) -> Path:
    """A feature file laid out as CLAM's ``extract_features_fp.py`` writes it (float32 features, int32
    coords), with the patch files' ``patch_size``/``patch_level`` on ``coords`` when ``attrs``."""
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features.astype(np.float32))
        xy = f.create_dataset("coords", data=coords.astype(np.int32))
        if attrs:
            xy.attrs.update({"patch_size": GRID, "patch_level": 0, "downsample": (1.0, 1.0)})
    return path


#: the encoder folder the workflow's layout gives a planted cohort's features (see :func:`as_runs`)
PLANTED_ENCODER = "planted"


def as_runs(out: Path, dest: Path, models: Sequence[str]) -> Path:
    """Copy ``out/results/<model>`` and ``out/models/<model>`` (as :func:`train` writes them) into the
    workflow's layout, ``dest/{results,models}/{encoder}/{model}``: ``none`` for a model that reads no
    slides, else :data:`PLANTED_ENCODER`. Returns ``dest``."""
    from healnet.data.results import NO_ENCODER, run_name
    from healnet.modalities import MODEL_MODALITIES

    for model in models:
        encoder = PLANTED_ENCODER if "wsi" in MODEL_MODALITIES[model] else NO_ENCODER
        for kind in ("results", "models"):
            shutil.copytree(out / kind / model, dest / kind / run_name(encoder, model), dirs_exist_ok=True)
    return dest


# ------------------------------------------------------------------ the training tests' cohort

#: patients of :func:`training_cohort` without usable slide features: no slide at all, a store
#: without patches, a slide listed in the manifest but never extracted
NO_SLIDE, EMPTY_STORE, UNEXTRACTED = "TCGA-AA-0003", "TCGA-AA-0010", "TCGA-AA-0017"
NO_WSI = frozenset({NO_SLIDE, EMPTY_STORE, UNEXTRACTED})
#: patients of :func:`training_cohort` without omics
NO_OMICS = frozenset({"TCGA-AA-0005", "TCGA-AA-0012"})


def training_cohort(root: Path) -> Cohort:
    """The training tests' cohort: 24 patients in 3 round-robin folds (patient ``i`` held out in fold
    ``i % 3``), 16-dim slide features, every kind of missing slide (:data:`NO_WSI`), two patients
    without omics (:data:`NO_OMICS`) and one missing omic value."""
    return planted_cohort(root, n_patients=24, n_folds=3, dim=16, no_wsi=[NO_SLIDE], no_omics=NO_OMICS,
                          empty_stores=[EMPTY_STORE], unextracted=[UNEXTRACTED],
                          missing_values=[("TCGA-AA-0001", "rna:G2")])


_SHARED: dict[tuple[str, ...], Any] = {}


def shared_cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Cohort, Path]:
    """One :func:`training_cohort` and its default config (:func:`write_config`) for the whole pytest
    session, so that every module's tests can compare against the runs of :func:`shared_run`.
    Tests must not change it: copy what they damage."""
    key = (str(tmp_path_factory.getbasetemp()), "cohort")
    if key not in _SHARED:
        root = tmp_path_factory.mktemp("cohort")
        _SHARED[key] = training_cohort(root), write_config(root / "config.yaml")
    return _SHARED[key]


def shared_run(tmp_path_factory: pytest.TempPathFactory, model: str) -> Path:
    """The folder ``out`` of one all-fold ``healnet train`` of ``model`` on :func:`shared_cohort`
    (``out/models/<model>``, ``out/results/<model>``; every model in the same ``out``), trained once
    per pytest session with the config's reader processes."""
    cohort, config = shared_cohort(tmp_path_factory)
    key = (str(tmp_path_factory.getbasetemp()), "run", model)
    if key not in _SHARED:
        out = cohort.root / "run"
        status = train(cohort, config, model, out, workers=None)
        assert status == 0, f"healnet train --model {model} exited {status}"
        _SHARED[key] = out
    return _SHARED[key]


def damage_store(path: Path, how: str) -> Path:
    """Damage a feature store as disks, copies and killed jobs do: ``incomplete`` (its writer never
    finished: no ``complete`` mark), ``missing_chunk`` (a chunk file gone, a partial copy: zarr would
    read zeros), ``bad_metadata`` (metadata no longer JSON), ``undecodable`` (a chunk that no longer
    decompresses)."""
    chunk = path / "features" / "c" / "0" / "0"
    if how == "incomplete":
        del zarr.open_group(str(path), mode="r+").attrs["complete"]
    elif how == "missing_chunk":
        chunk.unlink()
    elif how == "bad_metadata":
        (path / "zarr.json").write_text("{oops")
    elif how == "undecodable":
        chunk.write_bytes(b"not a zstd frame")
    else:
        raise ValueError(f"unknown damage {how!r}")
    return path



# ------------------------------------------------------------------ what a training run gave

RunOutputs = tuple[pd.DataFrame, pd.DataFrame, list]


def fold0_outputs(cohort: Cohort, config: Path, out: Path, *extra: str) -> tuple[RunOutputs, dict]:
    """Train HEALNet's fold 0 (reader processes as the config says); its ``(folds.csv, predictions,
    per-epoch losses)`` and its ``log.json``."""
    assert train(cohort, config, "healnet", out, "--folds", "0", *extra, workers=None) == 0
    results = out / "results" / "healnet"
    log = json.loads((results / "log.json").read_text())
    losses = [e.get("train_loss") for e in log["folds"][0]["epochs"]]
    return (pd.read_csv(results / "folds.csv"), pd.read_parquet(results / "predictions.parquet"), losses), log


def assert_same_outputs(outputs: list[RunOutputs]) -> None:
    """Every run's ``folds.csv``, predictions and losses equal the first's."""
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
