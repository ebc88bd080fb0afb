"""Small cohorts for tests, written with the production writers.

A cohort is an omics folder (``manifest.parquet``, ``features.parquet``, ``splits.parquet``,
``summary.json``, written by :func:`preprocessing.omics.directory.write_omics_dir`) and a folder of
per-slide feature stores (written by :func:`preprocessing.features.store.write_store`, the writer
extraction uses, with the features of a stub encoder). A planted risk ``z`` per patient sets its
survival time and shows in a few omic genes and in some patches of its slide, so a model that learns
can rank the patients, and the planted risk itself bounds how well it can.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from preprocessing.features.store import write_store
from preprocessing.omics.directory import write_omics_dir

#: what a stub encoder writes into a store's attributes (the keys extraction records)
STUB_ENCODER = {"encoder": "stub", "weights": "random", "weights_sha256": None, "dtype": "float16"}


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
                   patches: tuple[int, int] = (10, 40)) -> Cohort:
    """Write a cohort whose survival follows a planted risk ``z ~ N(0, 1)``.

    Omics: ``rna:G0``..``rna:G9`` (the first three are ``z`` plus noise) and ``cnv:C0``..``cnv:C4``
    (noise); slides: ``patches`` rows per store, a third of them carrying ``z`` in their first four
    dimensions. Patients in ``no_wsi`` have no slide, those in ``no_omics`` no omic row.
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
        write_feature_store(features_dir / f"{slide_stem(patient, i)}.zarr", feats, coords)
        slides.append([slide_stem(patient, i)])
    manifest = pd.DataFrame({"patient": patients, "time": time, "event": event, "slides": slides,
                             "has_wsi": [bool(s) for s in slides],
                             "has_omics": [p not in no_omics for p in patients]})
    rna = rng.normal(size=(n_patients, 10)) + np.outer(z, np.r_[np.ones(3), np.zeros(7)])
    cnv = rng.integers(-2, 3, size=(n_patients, 5)).astype(float)
    omics = pd.DataFrame(np.c_[rna, cnv], index=pd.Index(patients, name="patient"),
                         columns=[f"rna:G{j}" for j in range(10)] + [f"cnv:C{j}" for j in range(5)])
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


def train(cohort: Cohort, config: Path, model: str, out: Path, *extra: str) -> int:
    """``healnet train`` of one model on CPU, one torch thread, bags read in this process, into
    ``out/models/<model>`` and ``out/results/<model>``; torch's thread count is restored after."""
    import torch

    from healnet.cli import main

    threads = torch.get_num_threads()
    try:
        return main(["train", "--config", str(config), "--cohort", "TINY", "--model", model,
                     "--omics-dir", str(cohort.omics_dir), "--features-dir", str(cohort.features_dir),
                     "--models-dir", str(out / "models" / model),
                     "--results-dir", str(out / "results" / model),
                     "--device", "cpu", "--threads", "1", "--workers", "0", *extra])
    finally:
        torch.set_num_threads(threads)
