"""Cross-validated training of one model on one cohort: ``healnet train``.

Per fold (patient-level, from ``splits.parquet``; role ``val`` is the held-out fold):

1. fit the omic transform (log, MAD feature selection, imputation, scaling) and the survival time bins
   on the fold's training patients only;
2. train with AdamW on the discrete-time NLL (+ L1 on the omic input projection), fixed epochs or early
   stopping on an inner validation split carved from the training fold (stratified by event, seeded);
   the held-out fold is never looked at while training;
3. score the held-out patients with every patch of their slides, in the settings ``full`` and, for
   multimodal models, ``omics_only`` / ``wsi_only`` / ``random_half`` (each patient with both
   modalities loses one at random, seeded);
4. write ``fold{k}.pt`` (weights, model spec, transform and bin states, feature names, WSI feature dim,
   training-median risk).

While a fold trains, its state (weights, optimiser, random generators, history) is saved at the end
of an epoch at most every ``training.save_state_minutes`` to ``MODELS_DIR/unfinished-fold{k}.pt``, and
deleted once ``fold{k}.pt`` is written. A job killed by a cluster's time limit or a pre-emption
therefore resumes at the saved epoch when it is rerun, with the numbers an uninterrupted run gives,
provided the settings and data are those that made the file (it is ignored otherwise).

Patients a model cannot score (a unimodal model's patients without its modality, or anyone left
without any modality in a missing-modality setting) are excluded from that model's training and
scored with the training-median risk (training-mean survival curve for the Brier score), so every
model is evaluated on the same patients; ``folds.csv`` counts them in ``n_imputed``.

Outputs: ``MODELS_DIR/fold{k}.pt``; ``RESULTS_DIR/folds.csv`` (model, fold, setting, metric, value,
n_patients, n_events, n_imputed, note), ``predictions.parquet`` (patient, fold, setting, risk, time,
event, train_median_risk, imputed), ``log.json`` (per-epoch losses and timings, notes).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split
from sksurv.metrics import concordance_index_censored
from torch.optim.swa_utils import AveragedModel

from healnet.config import BAGS_ON_DEVICE_WORDS, TRAINING_RUN_SETTINGS, load_config
from healnet.data.bags import (
    BagBatchSampler,
    BagDataset,
    OmicsTables,
    ResidentBags,
    checked_batches,
    index_stores,
    load_omics_dir,
    make_loader,
)
from healnet.evaluation.metrics import fold_metrics, survival_at, survival_knots
from healnet.modalities import MODEL_MODALITIES, MULTIMODAL
from healnet.models.baselines import build_model, model_spec
from healnet.models.ensemble import SeedEnsemble, fold_seed
from healnet.models.loss import (
    inverse_frequency_weights,
    nll_survival_loss,
    risk_from_logits,
    survival_from_logits,
)
from healnet.training.collect import parse_folds
from preprocessing.core.atomic import atomic_output, remove_stale_temporaries
from preprocessing.core.errors import InputError
from preprocessing.core.workers import resolve_workers, workers_argument

log = logging.getLogger(__name__)

SETTINGS = ("full", "omics_only", "wsi_only", "random_half")
# Left out of a saved state's fingerprint: the run settings, and the device setting, whose resolved
# type (``auto`` may become ``cuda``) the fingerprint records instead.
RUN_SETTINGS = (*TRAINING_RUN_SETTINGS, "device")


@dataclass(frozen=True)
class UnfinishedState:
    """Where an unfinished fold keeps its training state, how often it saves it, and the fingerprint of
    the settings and data that the saved state is only valid for."""

    path: Path
    every_s: float
    fingerprint: str

    def load(self) -> dict[str, Any] | None:
        """The saved state if it exists and matches; otherwise None (training starts from epoch 0)."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - an unreadable file only costs the saved epochs
            log.warning("%s: ignored, cannot be read (%s); training starts again", self.path, err)
            return None
        if state.get("fingerprint") != self.fingerprint:
            log.warning("%s: ignored, saved with other settings or data; training starts again", self.path)
            return None
        return state

    def save(self, state: dict[str, Any]) -> None:
        with atomic_output(self.path) as tmp:
            torch.save({**state, "fingerprint": self.fingerprint}, tmp)


def training_fingerprint(
    spec: dict[str, Any],
    training: dict[str, Any],
    device: torch.device,
    seed: int,
    dataset: BagDataset,
    rows: Sequence[int],
    val_rows: Sequence[int] | None,
) -> str:
    """A digest of everything a fold's training depends on: model, settings (run settings aside),
    device type, seed, the patients trained on, their inputs and labels, and each feature store
    (name, size, modification time: a re-extracted store is a new directory)."""
    digest = hashlib.sha256()
    settings = {k: v for k, v in training.items() if k not in RUN_SETTINGS}
    described = {"spec": spec, "training": settings, "device": device.type, "seed": seed,
                 "rows": list(rows), "val_rows": None if val_rows is None else list(val_rows)}
    digest.update(json.dumps(_plain(described), sort_keys=True, default=str).encode())
    for array in (dataset.omics, dataset.has_omics, dataset.bins, dataset.events, dataset.times):
        digest.update(np.ascontiguousarray(array).tobytes())
    for bag in dataset.bags:
        for store in bag:
            digest.update(f"{store.path.name}:{store.n}:{store.dim}:{os.stat(store.path).st_mtime_ns};".encode())
    return digest.hexdigest()


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an InputError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device", "cuda requested but no GPU is available")
    return torch.device(name)


def set_determinism(seed: int, threads: int | None) -> None:
    """Seed every generator and ask torch for deterministic kernels (same seed -> same numbers)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


# --- per-fold preprocessing --------------------------------------------------------------------


@dataclass
class OmicState:
    """The fitted omic transform of one fold and the column layout the model sees."""

    transform: Any
    columns: list[str]
    groups: list[tuple[str, int]]

    def matrix(self, features: pd.DataFrame, patients: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Transformed omics ``[P, F]`` (zeros where a patient has none) and the presence flags."""
        present = np.array([p in features.index for p in patients], dtype=bool)
        out = np.zeros((len(patients), len(self.columns)), dtype=np.float32)
        if present.any():
            rows = [p for p, ok in zip(patients, present, strict=True) if ok]
            out[present] = (
                self.transform.transform(features.loc[rows]).loc[:, self.columns].to_numpy(np.float32)
            )
        return out, present


def fit_omics(
    features: pd.DataFrame,
    train_patients: Sequence[str],
    training: dict[str, Any],
    survival: pd.DataFrame,
) -> OmicState:
    """Fit OmicTransform on the training patients with omics; columns grouped by modality.

    ``survival`` (``time`` and ``event`` indexed by patient) feeds the supervised screen of
    ``omic_select_by: cox``; only the training patients' rows of it are read.
    """
    from preprocessing.omics.transforms import OmicTransform

    rows = [p for p in train_patients if p in features.index]
    time = survival.loc[rows, "time"].to_numpy(float)
    event = survival.loc[rows, "event"].to_numpy(float)
    transform = OmicTransform(
        log_rna="auto",
        scale=True,
        max_features_per_modality=training["omic_max_features"],
        select_by=training["omic_select_by"],
        impute="median",
    ).fit(features.loc[rows], time, event)
    names = list(transform.feature_names_)
    modalities = getattr(transform, "modalities_", None) or {}
    if not modalities:
        for name in names:
            modalities.setdefault(name.split(":", 1)[0], []).append(name)
    columns = [c for cols in modalities.values() for c in cols]
    if sorted(columns) != sorted(names):
        raise RuntimeError("OmicTransform.modalities_ does not partition feature_names_")
    groups = [(str(m), len(cols)) for m, cols in modalities.items() if len(cols)]
    return OmicState(transform, columns, groups)


# --- training and scoring ------------------------------------------------------------------------


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
    }


def _forward(
    model: torch.nn.Module,
    batch: dict[str, Any],
    has_wsi: torch.Tensor | None = None,
    has_omics: torch.Tensor | None = None,
) -> torch.Tensor:
    return model(
        batch["wsi"],
        batch["wsi_mask"],
        batch["omics"],
        batch["has_wsi"] if has_wsi is None else has_wsi,
        batch["has_omics"] if has_omics is None else has_omics,
        wsi_coords=batch["coords"],
    )


def setting_flags(
    setting: str, has_wsi: np.ndarray, has_omics: np.ndarray, rng_seed: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Which modality each patient keeps in a missing-modality setting."""
    has_wsi, has_omics = has_wsi.copy(), has_omics.copy()
    if setting == "omics_only":
        has_wsi[:] = False
    elif setting == "wsi_only":
        has_omics[:] = False
    elif setting == "random_half":
        drop_wsi = np.random.default_rng(list(rng_seed)).random(len(has_wsi)) < 0.5
        both = has_wsi & has_omics
        has_wsi &= ~(both & drop_wsi)
        has_omics &= ~(both & ~drop_wsi)
    return has_wsi, has_omics


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    dataset: BagDataset,
    rows: Sequence[int],
    device: torch.device,
    flags: dict[str, tuple[np.ndarray, np.ndarray]],
    workers: int,
) -> dict[str, np.ndarray]:
    """Hazard logits ``[len(rows), K]`` per setting; ``flags`` maps setting -> (has_wsi, has_omics) per row.

    Each bag is read once (all patches) and scored in every setting.
    """
    model.eval()
    batch_size = 1 if dataset.read_wsi and dataset.has_wsi[list(rows)].any() else 256
    sampler = BagBatchSampler(rows, batch_size, shuffle=False, seed=0, sample=False)
    position = {r: i for i, r in enumerate(rows)}
    out = {s: np.zeros((len(rows), model_n_bins(model)), dtype=np.float32) for s in flags}
    for batch in checked_batches(make_loader(dataset, sampler, workers, pin_memory=device.type == "cuda")):
        batch = _to_device(batch, device)
        idx = [position[int(r)] for r in batch["row"]]
        for setting, (has_wsi, has_omics) in flags.items():
            hw = torch.as_tensor(has_wsi[idx], device=device) & batch["has_wsi"]
            ho = torch.as_tensor(has_omics[idx], device=device) & batch["has_omics"]
            if bool((hw | ho).any()):  # else nothing to read: the caller imputes these patients
                out[setting][idx] = _forward(model, batch, hw, ho).float().cpu().numpy()
    return out


def model_n_bins(model: torch.nn.Module) -> int:
    """Number of hazard outputs of a model (its last Linear layer's width)."""
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    return last.out_features


@dataclass
class FoldResult:
    """What one fold produced."""

    metrics: list[dict[str, Any]] = field(default_factory=list)
    predictions: list[pd.DataFrame] = field(default_factory=list)
    log: dict[str, Any] = field(default_factory=dict)


def _c_index(time_: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's c-index, NaN when no pair is comparable (no death, or no death before another's time)."""
    if not event.astype(bool).any():
        return float("nan")
    try:
        return float(concordance_index_censored(event.astype(bool), time_, risk)[0])
    except ValueError:  # scikit-survival's NoComparablePairException
        return float("nan")


def _inner_val_score(dataset: BagDataset, rows: np.ndarray, logits: np.ndarray, alpha: float
                     ) -> dict[str, float]:
    """What early stopping ranks epochs by: the inner-validation c-index, or, where it is undefined
    (a small split without a comparable pair), minus the validation NLL, so that the kept epoch is
    still the best on held-out data rather than the first one."""
    risk = risk_from_logits(torch.from_numpy(logits)).numpy()
    c = _c_index(dataset.times[rows], dataset.events[rows], risk)
    if np.isfinite(c):
        return {"inner_val_c_index": c, "score": c}
    nll = float(nll_survival_loss(torch.from_numpy(logits), torch.as_tensor(dataset.bins[rows]),
                                  torch.as_tensor(dataset.events[rows]), alpha=alpha))
    return {"inner_val_c_index": c, "inner_val_nll": nll, "score": -nll}


def train_model(
    model: torch.nn.Module,
    dataset: BagDataset,
    rows: np.ndarray,
    val_rows: np.ndarray | None,
    training: dict[str, Any],
    device: torch.device,
    seed: int,
    workers: int,
    weights: np.ndarray | None,
    multimodal: bool = False,
    unfinished: UnfinishedState | None = None,
    keep_final: bool = False,
    resident: ResidentBags | None = None,
) -> list[dict[str, Any]]:
    """Train in place; with ``val_rows`` keep the epoch with the best inner-validation c-index.

    ``multimodal`` models get ``training.modality_dropout``: each training sample that has both
    modalities loses one of them (50/50) with that probability, so the model also learns to predict
    from one modality (a seeded generator keeps runs reproducible). Batches are cut from ``resident``
    (the bags of ``rows`` already on ``device``: :func:`resident_bags`) when given, else read by the
    loader's readers at every epoch. With ``unfinished``, training
    resumes from its saved state and saves its own at epoch ends; with ``keep_final`` also when
    training ends, so that a finished model (an ensemble member) is not trained again after a kill.
    Without ``val_rows``, a positive ``training.average_last_epochs`` leaves the model with the mean
    of its weights at the ends of the last that many epochs (stochastic weight averaging) instead of
    the last epoch's weights.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=training["lr"], weight_decay=training["weight_decay"])
    sampler = BagBatchSampler(rows, training["batch_size"], shuffle=True, seed=seed, sample=True)
    pinned = device.type == "cuda"
    loader = None if resident is not None else make_loader(dataset, sampler, workers, pin_memory=pinned)
    weight_t = torch.as_tensor(weights, device=device) if weights is not None else None
    accum, alpha, l1 = training["grad_accumulation"], training["alpha"], training["l1_omics"]
    drop_p = float(training.get("modality_dropout", 0.0)) if multimodal else 0.0
    drop_gen = torch.Generator().manual_seed(seed)
    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    first_epoch, last_saved = 0, time.monotonic()
    average_from = training["epochs"] - int(training.get("average_last_epochs", 0))
    averaged = AveragedModel(model) if val_rows is None and average_from < training["epochs"] else None
    saved = unfinished.load() if unfinished is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        if averaged is not None:
            averaged.load_state_dict(saved["averaged"])
        opt.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"]["torch"])
        drop_gen.set_state(saved["rng"]["modality_dropout"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(saved["rng"]["cuda"], device)
        history, best = saved["history"], saved["best"]
        first_epoch = training["epochs"] if saved.get("finished") else int(saved["epoch"]) + 1
        log.info("resuming at epoch %d from %s", first_epoch, unfinished.path)

    def save_state(epoch: int, finished: bool = False) -> None:
        assert unfinished is not None
        rng = {"torch": torch.get_rng_state(), "modality_dropout": drop_gen.get_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        kept = None if best is None else (best[0], best[1], {k: v.cpu() for k, v in best[2].items()})
        unfinished.save({
            "epoch": epoch,
            "finished": finished,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": opt.state_dict(),
            "averaged": None if averaged is None else averaged.state_dict(),
            "rng": rng,
            "history": history,
            "best": kept,
        })

    for epoch in range(first_epoch, training["epochs"]):
        model.train()
        sampler.set_epoch(epoch)
        total_loss, n_seen, wait, start = 0.0, 0, 0.0, time.perf_counter()
        opt.zero_grad(set_to_none=True)
        iterator = checked_batches(loader) if resident is None else map(resident.collate, sampler)
        step = 0
        while True:
            t0 = time.perf_counter()
            batch = next(iterator, None)
            wait += time.perf_counter() - t0
            if batch is None:
                break
            batch = _to_device(batch, device)
            if drop_p > 0:
                drop, pick_wsi = torch.rand(2, len(batch["row"]), generator=drop_gen) < torch.tensor(
                    [[drop_p], [0.5]]
                )
                drop = drop.to(device) & batch["has_wsi"] & batch["has_omics"]
                pick_wsi = pick_wsi.to(device)
                batch["has_wsi"] = batch["has_wsi"] & ~(drop & pick_wsi)
                batch["has_omics"] = batch["has_omics"] & ~(drop & ~pick_wsi)
            logits = _forward(model, batch)
            w = weight_t[batch["row"]] if weight_t is not None else None
            loss = nll_survival_loss(logits, batch["bin"], batch["event"], alpha=alpha, weights=w)
            if l1 > 0:
                loss = loss + l1 * model.l1_penalty()
            (loss / accum).backward()
            step += 1
            if step % accum == 0 or step == len(sampler):
                opt.step()
                opt.zero_grad(set_to_none=True)
            total_loss += float(loss.detach()) * len(batch["row"])
            n_seen += len(batch["row"])
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        record = {
            "epoch": epoch,
            "train_loss": total_loss / max(n_seen, 1),
            "seconds": round(seconds, 3),
            "data_wait_fraction": round(wait / seconds, 4) if seconds > 0 else 0.0,
            "patients_per_s": round(n_seen / seconds, 2) if seconds > 0 else 0.0,
        }
        if epoch == first_epoch > 0:
            record["resumed"] = True
        if val_rows is not None and len(val_rows):
            logits = predict(
                model, dataset, val_rows, device, {"full": _all_flags(dataset, val_rows)}, workers
            )
            scored = _inner_val_score(dataset, val_rows, logits["full"], alpha)
            score = scored.pop("score")
            record.update(scored)
            if best is None or score > best[0]:
                best = (score, epoch, copy.deepcopy(model.state_dict()))
            elif epoch - best[1] >= training["patience"]:
                history.append(record)
                log.info("early stop at epoch %d (best %d, inner-validation score %.4f)",
                         epoch, best[1], best[0])
                break
        history.append(record)
        if averaged is not None and epoch >= average_from:
            averaged.update_parameters(model)
        log.info(
            "epoch %d loss %.4f %.1fs%s",
            epoch,
            record["train_loss"],
            seconds,
            f" inner-val c-index {record['inner_val_c_index']:.4f}" if "inner_val_c_index" in record else "",
        )
        due = unfinished is not None and time.monotonic() - last_saved >= unfinished.every_s
        if due and epoch + 1 < training["epochs"]:
            save_state(epoch)
            last_saved = time.monotonic()
    if keep_final and unfinished is not None and first_epoch < training["epochs"]:
        save_state(training["epochs"] - 1, finished=True)
    if averaged is not None:
        model.load_state_dict(averaged.module.state_dict())
        history.append({"averaged_epochs": int(averaged.n_averaged)})
    if best is not None:
        model.load_state_dict(best[2])
        kept = next(r for r in history if r.get("epoch") == best[1])
        by = "inner_val_nll" if "inner_val_nll" in kept else "inner_val_c_index"
        history.append({"restored_epoch": best[1], by: kept[by]})
    return history


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: the GPU's free memory, or the machine's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def resident_bags(
    dataset: BagDataset, rows: Sequence[int], device: torch.device, workers: int, setting: bool | str
) -> ResidentBags | None:
    """The training bags kept on ``device`` when ``training.bags_on_device`` asks for it (``auto``: on
    a GPU) and they fit in three quarters of its free memory; otherwise None, and the loader's
    readers read them at every epoch (said in the log when the bags were asked for but do not fit)."""
    wanted = setting is True or (setting == "auto" and device.type == "cuda")
    if not wanted or not dataset.read_wsi or not dataset.has_wsi[list(rows)].any():
        return None
    need, free = ResidentBags.nbytes(dataset, rows), free_memory(device)
    if need > 0.75 * free:
        log.warning("training.bags_on_device: the training bags need %.1f GiB, %.1f GiB of %s memory is "
                    "free; they are read from the stores at every epoch instead", need / 2**30,
                    free / 2**30, device.type)
        return None
    try:
        bags = ResidentBags(dataset, rows, device, workers)
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning("training.bags_on_device: %s memory ran out while the bags were loaded; they are "
                    "read from the stores at every epoch instead", device.type)
        return None
    log.info("%d training bags (%.1f GiB) kept in %s memory", len(bags.features), need / 2**30, device.type)
    return bags


def _all_flags(dataset: BagDataset, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    rows = list(rows)
    return dataset.has_wsi[rows].copy(), dataset.has_omics[rows].copy()


# --- the cross-validation loop ---------------------------------------------------------------------


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


def run_fold(
    cohort: Cohort,
    model_name: str,
    fold: int,
    config: dict[str, Any],
    device: torch.device,
    models_dir: Path,
    workers: int,
    cache_dir: Path | None = None,
) -> FoldResult:
    """Fit preprocessing, train, score and checkpoint one fold (``cache_dir``: decoded features)."""
    from preprocessing.omics.labels import TimeBins

    training, manifest = config["training"], cohort.tables.manifest
    mods = MODEL_MODALITIES[model_name]
    # saved states are large: those a killed save left under a temporary name go (only this fold's,
    # as the job that owns them; a writer still running is left alone)
    for name in (f"fold{fold}.pt", f"unfinished-fold{fold}.pt", f"unfinished-fold{fold}-member*.pt"):
        remove_stale_temporaries(models_dir / name)
    seed = fold_seed(int(training["seed"]), fold)
    set_determinism(seed, None)
    train_p, test_p = fold_patients(cohort.tables, fold, set(cohort.patients))
    if not train_p or not test_p:
        raise InputError("splits.parquet", f"fold {fold} has no training or no held-out patients")
    pos = {p: i for i, p in enumerate(cohort.patients)}
    times = manifest["time"].to_numpy(float)
    events = manifest["event"].to_numpy(int)
    train_rows = np.array([pos[p] for p in train_p])
    test_rows = np.array([pos[p] for p in test_p])
    n_bins = int(config["omics"]["n_bins"])
    bins_fit = TimeBins(n_bins).fit(times[train_rows], events[train_rows])
    bins = np.asarray(bins_fit.transform(times), dtype=np.int64)

    uses_omics = "omics" in mods and cohort.has_omics.any()
    uses_wsi = "wsi" in mods and cohort.wsi_dim is not None
    omic_state = (
        fit_omics(cohort.tables.features, train_p, training, manifest[["time", "event"]])
        if uses_omics
        else None
    )
    if omic_state is not None:
        omics, has_omics = omic_state.matrix(cohort.tables.features, cohort.patients)
    else:
        omics, has_omics = (
            np.zeros((len(cohort.patients), 0), np.float32),
            np.zeros(len(cohort.patients), bool),
        )
    has_wsi = cohort.has_wsi if uses_wsi else np.zeros(len(cohort.patients), bool)
    dataset = BagDataset(
        omics,
        has_omics,
        [b if uses_wsi else [] for b in cohort.bags],
        bins,
        events,
        times,
        max_patches=training["max_patches_train"],
        read_wsi=uses_wsi,
        cache_dir=cache_dir,
    )
    usable = has_wsi | has_omics
    fit_rows = train_rows[usable[train_rows]]
    if len(fit_rows) < 2:
        raise InputError(
            "splits.parquet", f"fold {fold}: fewer than 2 training patients have {sorted(mods)} data"
        )

    spec = model_spec(
        model_name,
        n_bins=n_bins,
        wsi_dim=cohort.wsi_dim if uses_wsi else None,
        n_omics=omics.shape[1] if uses_omics else None,
        omic_groups=omic_state.groups if omic_state else None,
        healnet_cfg=config["healnet"],
        training_cfg=training,
    )
    val_rows = None
    inner_rows = fit_rows
    if training["early_stopping"]:
        strat = events[fit_rows] if np.bincount(events[fit_rows], minlength=2).min() >= 2 else None
        inner_rows, val_rows = train_test_split(
            fit_rows, test_size=training["inner_val_fraction"], stratify=strat, random_state=seed
        )
        inner_rows, val_rows = np.sort(inner_rows), np.sort(val_rows)
    weights = None
    if training["bin_weights"]:
        weights = np.ones(len(cohort.patients), np.float32)
        weights[inner_rows] = inverse_frequency_weights(bins[inner_rows], n_bins)
    # read once for every member: the bags do not depend on the seed
    resident = resident_bags(dataset, inner_rows, device, workers, training.get("bags_on_device", False))
    n_members = int(training.get("ensemble", 1))
    if val_rows is not None and int(training.get("average_last_epochs", 0)) > 0:
        log.warning("average_last_epochs is not used with early_stopping: the best inner-validation "
                    "epoch is kept")
    members, histories = [], []
    for member in range(n_members):
        # member i is the model a single run with training.seed + i trains (member 0: this run's)
        m_seed = fold_seed(int(training["seed"]), fold, member)
        suffix = f"-member{member}" if member else ""
        unfinished = UnfinishedState(
            models_dir / f"unfinished-fold{fold}{suffix}.pt",
            60.0 * float(training["save_state_minutes"]),
            training_fingerprint(spec, training, device, m_seed, dataset, inner_rows, val_rows),
        )
        torch.manual_seed(m_seed)
        members.append(build_model(spec).to(device))
        histories.append(train_model(
            members[-1],
            dataset,
            inner_rows,
            val_rows,
            training,
            device,
            m_seed,
            workers,
            weights,
            model_name in MULTIMODAL,
            unfinished,
            keep_final=n_members > 1,
            resident=resident,
        ))
    bags_seconds = None if resident is None else resident.load_seconds
    del resident  # scoring reads every patch of the held-out bags: free the device memory first
    if n_members == 1:
        model, history = members[0], histories[0]
    else:
        model, spec = SeedEnsemble(members), {**spec, "members": n_members}
        history = [{**record, "member": m} for m, h in enumerate(histories) for record in h]

    # training-fold risks: median for imputation and for the report's Kaplan-Meier split
    train_logits = predict(
        model, dataset, fit_rows, device, {"full": _all_flags(dataset, fit_rows)}, workers
    )["full"]
    train_surv = survival_from_logits(torch.from_numpy(train_logits)).numpy()
    train_median = float(np.median(-train_surv.sum(-1)))
    mean_surv = train_surv.mean(0)

    settings = ["full"]
    if model_name in MULTIMODAL and uses_wsi and uses_omics:
        settings += ["omics_only", "wsi_only", "random_half"]
    flags = {s: setting_flags(s, has_wsi[test_rows], has_omics[test_rows], [seed, 17]) for s in settings}
    test_logits = predict(model, dataset, test_rows, device, flags, workers)

    knots = survival_knots(np.asarray(bins_fit.edges_), n_bins, float(times[train_rows].max()))
    result = FoldResult(
        log={
            "fold": fold,
            "n_train": int(len(inner_rows)),
            "n_inner_val": int(len(val_rows)) if val_rows is not None else 0,
            "n_test": int(len(test_rows)),
            **({} if bags_seconds is None else {"bags_on_device_seconds": round(bags_seconds, 3)}),
            "epochs": history,
        }
    )
    for setting in settings:
        hw, ho = flags[setting]
        scored = (hw | ho) if model_name in MULTIMODAL else (hw if uses_wsi else ho)
        surv = survival_from_logits(torch.from_numpy(test_logits[setting])).numpy()
        surv[~scored] = mean_surv
        risk = -surv.sum(-1)
        risk[~scored] = train_median
        t_test, e_test = times[test_rows], events[test_rows]
        rows = fold_metrics(
            times[train_rows],
            events[train_rows],
            t_test,
            e_test,
            risk,
            lambda grid, s=surv: survival_at(s, knots, grid),
        )
        for row in rows:
            result.metrics.append(
                {
                    "model": model_name,
                    "fold": fold,
                    "setting": setting,
                    **row,
                    "n_patients": int(len(test_rows)),
                    "n_events": int(e_test.sum()),
                    "n_imputed": int((~scored).sum()),
                }
            )
        result.predictions.append(
            pd.DataFrame(
                {
                    "patient": [cohort.patients[r] for r in test_rows],
                    "fold": fold,
                    "setting": setting,
                    "risk": risk,
                    "time": t_test,
                    "event": e_test,
                    "train_median_risk": train_median,
                    "imputed": ~scored,
                }
            )
        )
        log.info("fold %d %s c-index %.4f", fold, setting, rows[0]["value"])

    checkpoint = _plain(
        {
            "model_spec": spec,
            "omic_transform": omic_state.transform.state_dict() if omic_state else None,
            "time_bins": bins_fit.state_dict(),
            "feature_names": omic_state.columns if omic_state else [],
            "omic_groups": omic_state.groups if omic_state else [],
            "wsi_dim": cohort.wsi_dim if uses_wsi else None,
            "train_median_risk": train_median,
            "train_mean_survival": mean_surv.tolist(),
            "fold": fold,
            "train_patients": train_p,
            "test_patients": test_p,
            "training": dict(training),
        }
    )
    checkpoint["state_dict"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_output(models_dir / f"fold{fold}.pt") as tmp:
        torch.save(checkpoint, tmp)
    # this fold's saved states, a larger ensemble's left-over members' included
    for path in [*models_dir.glob(f"unfinished-fold{fold}.pt"),
                 *models_dir.glob(f"unfinished-fold{fold}-member*.pt")]:
        path.unlink(missing_ok=True)
    return result


def _plain(obj: Any) -> Any:
    """NumPy arrays and scalars -> lists and Python numbers, so checkpoints load with weights_only=True."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a trained model (eval mode) from ``fold{k}.pt``; returns (model, checkpoint dict).

    Checkpoint keys: model_spec, state_dict, omic_transform and time_bins (``state_dict()`` of
    OmicTransform / TimeBins, as plain lists), feature_names and omic_groups (column order the model
    sees), wsi_dim, train_median_risk, train_mean_survival, fold, train_patients, test_patients, training.
    """
    try:
        ckpt = torch.load(Path(path), map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever torch.load trips on, the file is unusable
        reason = " ".join(str(err).split()) or type(err).__name__
        raise InputError(path, f"cannot read checkpoint ({reason}); delete it and rerun its fold") from err
    model = build_model(ckpt["model_spec"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt


@contextmanager
def decoded_feature_cache(root: str | Path | None) -> Iterator[Path | None]:
    """A private folder under ``root`` for this run's decoded features, removed when the run ends
    (None without ``root``). Private to the run, so no other job's or an older run's files are
    ever read: the stores cannot change under it."""
    if not root:
        yield None
        return
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        folder = tempfile.mkdtemp(prefix="healnet-features-", dir=root)
    except OSError as err:
        reason = f"cannot make a folder in {root} ({err.strerror or err})"
        raise InputError("training.feature_cache", reason) from err
    try:
        log.info("decoded features cached in %s for this run", folder)
        yield Path(folder)
    finally:
        # Readers of a run ended by an exception (SIGTERM included) may still be writing: once the
        # folder is gone they cannot make it again, so a few tries remove it for good.
        for _ in range(20):
            shutil.rmtree(folder, ignore_errors=True)
            if not Path(folder).exists():
                break
            time.sleep(0.1)


def run_cv(
    config: dict[str, Any],
    cohort_name: str,
    model_name: str,
    omics_dir: Path,
    features_dir: Path | None,
    models_dir: Path,
    results_dir: Path,
    device: torch.device,
    folds: Sequence[int] | None = None,
    threads: int | None = None,
) -> pd.DataFrame:
    """Train and score every requested fold; write the outputs; return the ``folds.csv`` table."""
    if model_name not in MODEL_MODALITIES:
        raise InputError("--model", f"unknown model {model_name!r}; choose from {sorted(MODEL_MODALITIES)}")
    if threads:
        torch.set_num_threads(threads)
    # checked before the cohort is read; log.json records the number that ran, and no cache as null
    workers = resolve_workers(config["training"]["workers"], device.type, torch.get_num_threads())
    cache = config["training"]["feature_cache"]
    cache = None if cache in ("", "none") else cache  # "none": how the workflow and the CLI say no cache
    config = {**config, "training": {**config["training"], "workers": workers, "feature_cache": cache}}
    cohort = prepare_cohort(model_name, omics_dir, features_dir)
    available = sorted(int(f) for f in cohort.tables.splits["fold"].unique())
    folds = available if folds is None else list(folds)
    bad = [f for f in folds if f not in available]
    if bad:
        raise InputError("--folds", f"fold(s) {bad} not in splits.parquet (has {available})")
    models_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cache_root = config["training"]["feature_cache"] if cohort.wsi_dim is not None else None
    with decoded_feature_cache(cache_root) as cache_dir:
        results = [run_fold(cohort, model_name, f, config, device, models_dir, workers, cache_dir)
                   for f in folds]
    table = pd.DataFrame([m for r in results for m in r.metrics])
    predictions = pd.concat([p for r in results for p in r.predictions], ignore_index=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(results_dir / "folds.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_output(results_dir / "predictions.parquet") as tmp:
        predictions.to_parquet(tmp, index=False)
    record = {
        "cohort": cohort_name,
        "model": model_name,
        "device": str(device),
        "notes": cohort.notes,
        "training": config["training"],
        "healnet": config["healnet"],
        "n_bins": config["omics"]["n_bins"],
        "seconds": round(time.perf_counter() - started, 2),
        "folds": [r.log for r in results],
    }
    with atomic_output(results_dir / "log.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1, default=float))
    return table


def cli(argv: list[str] | None = None) -> int:
    """``healnet train``: cross-validated training of one model on one cohort."""
    parser = argparse.ArgumentParser(prog="healnet train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="config.yaml (or the JSON snapshot Snakemake writes)")
    parser.add_argument("--cohort", required=True)
    parser.add_argument("--model", required=True, choices=sorted(MODEL_MODALITIES))
    parser.add_argument("--omics-dir", required=True, type=Path)
    parser.add_argument(
        "--features-dir",
        type=Path,
        default=None,
        help="folder of {slide}.zarr stores (absent or empty: no WSI)",
    )
    parser.add_argument("--models-dir", required=True, type=Path)
    parser.add_argument("--results-dir", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--workers", type=workers_argument, default=None,
                        help="processes reading WSI bags, or auto (default: training.workers of the config)")
    parser.add_argument("--save-state-minutes", type=int, default=None,
                        help="save an unfinished fold's state at most this often, 0: every epoch "
                        "(default: training.save_state_minutes of the config)")
    parser.add_argument("--feature-cache", default=None, metavar="DIR",
                        help="decode each feature store once into a private folder under DIR, removed at the "
                        "end; 'none' for none (default: training.feature_cache of the config)")
    parser.add_argument("--bags-on-device", choices=list(BAGS_ON_DEVICE_WORDS), default=None,
                        help="keep the training bags in the device's memory after one read (auto: on a GPU, "
                        "when they fit; default: training.bags_on_device of the config)")
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default=None,
        help="default: training.device of the config",
    )
    parser.add_argument("--folds", default=None, help="comma-separated fold numbers (default: all)")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    device = resolve_device(args.device or config["training"]["device"])
    if args.workers is not None:
        config["training"]["workers"] = args.workers
    if args.threads is not None:
        config["training"]["threads"] = args.threads  # recorded in log.json as run
    if args.save_state_minutes is not None:
        if args.save_state_minutes < 0:
            raise InputError("--save-state-minutes", f"must be 0 or more, got {args.save_state_minutes}")
        config["training"]["save_state_minutes"] = args.save_state_minutes
    if args.feature_cache is not None:
        config["training"]["feature_cache"] = args.feature_cache
    if args.bags_on_device is not None:
        config["training"]["bags_on_device"] = BAGS_ON_DEVICE_WORDS[args.bags_on_device]
    table = run_cv(
        config,
        args.cohort,
        args.model,
        args.omics_dir,
        args.features_dir,
        args.models_dir,
        args.results_dir,
        device,
        parse_folds(args.folds),
        args.threads,
    )
    full = table[(table["setting"] == "full") & (table["metric"] == "c_index")]["value"]
    summary = f"c-index {full.mean():.4f} ± {full.std(ddof=0):.4f} over {len(full)} fold(s)"
    print(f"{args.cohort} {args.model}: {summary}")
    return 0
