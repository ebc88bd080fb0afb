"""One cohort as training sees it: its tables, its patients' feature stores, which modalities a model
gets, and each fold's training and held-out patients (from ``splits.parquet``; role ``val`` is the
held-out fold)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from healnet.data.stores import index_stores
from healnet.modalities import MODEL_MODALITIES
from preprocessing.core.errors import InputError
from preprocessing.omics.directory import OmicsTables, load_omics_dir

log = logging.getLogger(__name__)


@dataclass
class Cohort:
    """Everything fold-independent: tables, bags, which modalities exist."""

    tables: OmicsTables
    patients: list[str]
    bags: list[list[Any]]
    wsi_dim: int | None
    has_wsi: np.ndarray
    has_omics: np.ndarray
    notes: list[str]


def prepare_cohort(model_name: str, omics_dir: Path, features_dir: Path | None) -> Cohort:
    """Load the tables and stores; decide which modalities the model gets (InputError when none)."""
    tables = load_omics_dir(omics_dir)
    manifest = tables.manifest
    mods = MODEL_MODALITIES[model_name]
    # a model without a WSI branch never opens a store: its workflow job does not wait for extraction
    bag_map, wsi_dim = index_stores(features_dir, manifest) if "wsi" in mods else ({}, None)
    patients = list(manifest.index)
    bags = [bag_map.get(p, []) for p in patients]
    has_wsi = np.array([len(b) > 0 for b in bags], dtype=bool)
    has_omics = manifest["has_omics"].to_numpy(bool) & np.isin(patients, tables.features.index)
    if tables.features.shape[1] == 0:
        has_omics[:] = False
    notes: list[str] = []
    if "wsi" in mods and not has_wsi.any():
        where = features_dir or "(no --features-dir)"
        if mods == {"wsi"}:
            raise InputError(
                where, f"model {model_name} needs WSI features but no patient has a non-empty store"
            )
        notes.append(f"no WSI feature stores with patches in {where}: {model_name} trained on omics alone")
        wsi_dim = None
    if "omics" in mods and not has_omics.any():
        if mods == {"omics"}:
            raise InputError(
                omics_dir / "features.parquet", f"model {model_name} needs omics but no patient has any"
            )
        notes.append(f"no omic features in {omics_dir}: {model_name} trained on WSI alone")
    for note in notes:
        log.warning(note)
    return Cohort(tables, patients, bags, wsi_dim, has_wsi, has_omics, notes)


def fold_patients(tables: OmicsTables, fold: int, known: set[str]) -> tuple[list[str], list[str]]:
    """(training, held-out) patients of a fold, in manifest order; unknown patients are dropped."""
    split = tables.splits[tables.splits["fold"] == fold]
    unknown = set(split["patient"]) - known
    if unknown:
        log.warning("fold %d: %d split patient(s) not in the manifest are ignored", fold, len(unknown))
    train = set(split.loc[split["role"] == "train", "patient"]) & known
    held = set(split.loc[split["role"] == "val", "patient"]) & known
    if train & held:
        raise InputError("splits.parquet", f"fold {fold}: patient {sorted(train & held)[0]} is on both sides")
    order = list(tables.manifest.index)
    return [p for p in order if p in train], [p for p in order if p in held]
