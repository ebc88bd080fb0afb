"""One cross-validation fold, step by step.

1. inputs: the fold's patients, seeded generators, survival time bins fitted on its training patients;
2. omics: the omic transform (log, feature selection, imputation, scaling) fitted on the training
   patients only, and the dataset the model reads;
3. members: the model (a seed ensemble's members one after another) trained with AdamW, fixed epochs
   or early stopping on an inner validation split carved from the training fold (stratified by
   event, seeded); the held-out patients are never looked at while training;
4. scoring: the held-out patients in every setting (:mod:`healnet.training.scoring`);
5. checkpoint: ``fold{k}.pt`` (:mod:`healnet.data.checkpoints`), after which the fold's saved
   training states (:mod:`healnet.training.resume`) are deleted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split

from healnet.data.bags import BagDataset
from healnet.data.checkpoints import write_checkpoint
from healnet.evaluation.metrics import survival_knots
from healnet.modalities import LINEAR_MODELS, MODEL_MODALITIES, MULTIMODAL
from healnet.models.baselines import build_model, model_spec
from healnet.models.ensemble import SeedEnsemble, fold_seed
from healnet.models.loss import inverse_frequency_weights, survival_from_logits
from healnet.settings import Settings, TrainingSettings
from healnet.training.cohort import Cohort, fold_patients
from healnet.training.linear import fit_linear
from healnet.training.loop import train_model
from healnet.training.memory import resident_bags
from healnet.training.resume import UnfinishedState, training_fingerprint
from healnet.training.scoring import SETTINGS, HeldOut, all_flags, predict, score_setting, setting_flags
from preprocessing.core.atomic import remove_stale_temporaries
from preprocessing.core.errors import InputError

log = logging.getLogger(__name__)


def set_determinism(seed: int, threads: int | None) -> None:
    """Seed every generator and ask torch for deterministic kernels (same seed -> same numbers)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


@dataclass
class FoldResult:
    """What one fold produced."""

    metrics: list[dict[str, Any]] = field(default_factory=list)
    predictions: list[pd.DataFrame] = field(default_factory=list)
    log: dict[str, Any] = field(default_factory=dict)


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
    training: TrainingSettings,
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
        max_features_per_modality=training.omic_max_features,
        select_by=training.omic_select_by,
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


@dataclass(frozen=True)
class FoldInputs:
    """One fold's patients (training and held-out, as rows of the cohort), survival labels and the
    time bins fitted on its training patients."""

    fold: int
    seed: int
    train_patients: list[str]
    test_patients: list[str]
    train_rows: np.ndarray
    test_rows: np.ndarray
    times: np.ndarray
    events: np.ndarray
    time_bins: Any
    bins: np.ndarray


def fold_inputs(cohort: Cohort, fold: int, seed: int, n_bins: int) -> FoldInputs:
    """Seed the fold's generators, split its patients and fit its time bins."""
    from preprocessing.omics.labels import TimeBins

    seed = fold_seed(seed, fold)
    set_determinism(seed, None)
    train_p, test_p = fold_patients(cohort.tables, fold, set(cohort.patients))
    if not train_p or not test_p:
        raise InputError("splits.parquet", f"fold {fold} has no training or no held-out patients")
    pos = {p: i for i, p in enumerate(cohort.patients)}
    manifest = cohort.tables.manifest
    times = manifest["time"].to_numpy(float)
    events = manifest["event"].to_numpy(int)
    train_rows = np.array([pos[p] for p in train_p])
    test_rows = np.array([pos[p] for p in test_p])
    time_bins = TimeBins(n_bins).fit(times[train_rows], events[train_rows])
    bins = np.asarray(time_bins.transform(times), dtype=np.int64)
    return FoldInputs(fold, seed, train_p, test_p, train_rows, test_rows, times, events, time_bins, bins)


@dataclass
class FoldData:
    """What the model of one fold reads: the fitted omics (None when it reads none), the dataset, which
    patients have which modality, and the training patients it can learn from."""

    omic_state: OmicState | None
    dataset: BagDataset
    has_wsi: np.ndarray
    has_omics: np.ndarray
    fit_rows: np.ndarray
    uses_wsi: bool
    uses_omics: bool


def fold_data(cohort: Cohort, model_name: str, inputs: FoldInputs, training: TrainingSettings,
              cache_dir: Path | None) -> FoldData:
    """Fit the fold's omic transform and build its dataset (``cache_dir``: decoded features)."""
    mods = MODEL_MODALITIES[model_name]
    uses_omics = "omics" in mods and bool(cohort.has_omics.any())
    uses_wsi = "wsi" in mods and cohort.wsi_dim is not None
    survival = cohort.tables.manifest[["time", "event"]]
    omic_state = None
    if uses_omics:
        omic_state = fit_omics(cohort.tables.features, inputs.train_patients, training, survival)
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
        inputs.bins,
        inputs.events,
        inputs.times,
        max_patches=training.max_patches_train,
        read_wsi=uses_wsi,
        cache_dir=cache_dir,
    )
    usable = has_wsi | has_omics
    fit_rows = inputs.train_rows[usable[inputs.train_rows]]
    if len(fit_rows) < 2:
        raise InputError(
            "splits.parquet", f"fold {inputs.fold}: fewer than 2 training patients have {sorted(mods)} data"
        )
    return FoldData(omic_state, dataset, has_wsi, has_omics, fit_rows, uses_wsi, uses_omics)


def fold_spec(model_name: str, cohort: Cohort, data: FoldData, settings: Settings) -> dict[str, Any]:
    """The model spec of one fold: the inputs its data has, the settings' shape."""
    return model_spec(
        model_name,
        n_bins=settings.n_bins,
        wsi_dim=cohort.wsi_dim if data.uses_wsi else None,
        n_omics=data.dataset.omics.shape[1] if data.uses_omics else None,
        omic_groups=data.omic_state.groups if data.omic_state else None,
        healnet=settings.healnet,
        training=settings.training,
    )


def inner_split(data: FoldData, inputs: FoldInputs, training: TrainingSettings
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """(rows trained on, inner validation rows or None): with early stopping, a seeded split of the
    training patients, stratified by event when each side can have two of both."""
    fit_rows, events = data.fit_rows, inputs.events
    if not training.early_stopping:
        return fit_rows, None
    strat = events[fit_rows] if np.bincount(events[fit_rows], minlength=2).min() >= 2 else None
    inner_rows, val_rows = train_test_split(
        fit_rows, test_size=training.inner_val_fraction, stratify=strat, random_state=inputs.seed
    )
    return np.sort(inner_rows), np.sort(val_rows)


@dataclass
class Trained:
    """The fold's trained model (a seed ensemble when it has several members), its spec, its training
    history and the seconds its bags took to load into the device's memory (None when they did not)."""

    model: torch.nn.Module
    spec: dict[str, Any]
    history: list[dict[str, Any]]
    bags_seconds: float | None


def train_members(model_name: str, spec: dict[str, Any], data: FoldData, inputs: FoldInputs,
                  rows: tuple[np.ndarray, np.ndarray | None], settings: Settings, device: torch.device,
                  models_dir: Path, workers: int) -> Trained:
    """Train ``training.ensemble`` members on ``rows`` (trained on, inner validation), each resuming
    from and saving to its own unfinished-state file."""
    training, (inner_rows, val_rows), fold = settings.training, rows, inputs.fold
    weights = None
    if training.bin_weights:
        weights = np.ones(len(inputs.bins), np.float32)
        weights[inner_rows] = inverse_frequency_weights(inputs.bins[inner_rows], settings.n_bins)
    # read once for every member: the bags do not depend on the seed
    resident = resident_bags(data.dataset, inner_rows, device, workers, settings.run.bags_on_device)
    n_members = training.ensemble
    if val_rows is not None and training.average_last_epochs > 0:
        log.warning("average_last_epochs is not used with early_stopping: the best inner-validation "
                    "epoch is kept")
    members, histories = [], []
    for member in range(n_members):
        # member i is the model a single run with training.seed + i trains (member 0: this run's)
        m_seed = fold_seed(training.seed, fold, member)
        suffix = f"-member{member}" if member else ""
        unfinished = UnfinishedState(
            models_dir / f"unfinished-fold{fold}{suffix}.pt",
            60.0 * float(settings.run.save_state_minutes),
            training_fingerprint(spec, training, device, m_seed, data.dataset, inner_rows, val_rows),
        )
        torch.manual_seed(m_seed)
        members.append(build_model(spec).to(device))
        histories.append(train_model(
            members[-1], data.dataset, inner_rows, val_rows, training, device, m_seed, workers, weights,
            model_name in MULTIMODAL, unfinished, keep_final=n_members > 1, resident=resident,
        ))
    bags_seconds = None if resident is None else resident.load_seconds
    del resident  # scoring reads every patch of the held-out bags: free the device memory first
    if n_members == 1:
        return Trained(members[0], spec, histories[0], bags_seconds)
    history = [{**record, "member": m} for m, h in enumerate(histories) for record in h]
    return Trained(SeedEnsemble(members), {**spec, "members": n_members}, history, bags_seconds)


def fit_closed_form(spec: dict[str, Any], data: FoldData, inputs: FoldInputs, settings: Settings,
                    device: torch.device, workers: int) -> Trained:
    """Fit a closed-form model (:data:`healnet.modalities.LINEAR_MODELS`) on the training fold."""
    model = build_model(spec).to(device)
    knots = survival_knots(np.asarray(inputs.time_bins.edges_), settings.n_bins,
                           float(inputs.times[inputs.train_rows].max()))
    history = fit_linear(model, data.dataset, data.fit_rows, knots, device, workers)
    return Trained(model, spec, history, None)


def score_fold(model_name: str, trained: Trained, data: FoldData, inputs: FoldInputs,
               rows: tuple[np.ndarray, np.ndarray | None], settings: Settings, device: torch.device,
               workers: int) -> tuple[FoldResult, HeldOut]:
    """Score the held-out patients in every setting the model has; also returns what stood in for
    the patients it could not score (kept in the checkpoint)."""
    model, dataset, fold = trained.model, data.dataset, inputs.fold
    # training-fold risks: median for imputation and for the report's Kaplan-Meier split
    fit_rows, train_rows, test_rows = data.fit_rows, inputs.train_rows, inputs.test_rows
    train_logits = predict(model, dataset, fit_rows, device, {"full": all_flags(dataset, fit_rows)}, workers)
    train_surv = survival_from_logits(torch.from_numpy(train_logits["full"])).numpy()
    both = model_name in MULTIMODAL and data.uses_wsi and data.uses_omics
    scored_settings = list(SETTINGS) if both else ["full"]
    flags = {s: setting_flags(s, data.has_wsi[test_rows], data.has_omics[test_rows], [inputs.seed, 17])
             for s in scored_settings}
    test_logits = predict(model, dataset, test_rows, device, flags, workers)
    times, events = inputs.times, inputs.events
    t_max = float(times[train_rows].max())
    knots = survival_knots(np.asarray(inputs.time_bins.edges_), settings.n_bins, t_max)
    held = HeldOut(
        model_name, fold, data.uses_wsi, list(inputs.test_patients),
        times[train_rows], events[train_rows], times[test_rows], events[test_rows],
        knots, float(np.median(-train_surv.sum(-1))), train_surv.mean(0),
    )
    inner_rows, val_rows = rows
    bags_seconds = trained.bags_seconds
    result = FoldResult(
        log={
            "fold": fold,
            "n_train": int(len(inner_rows)),
            "n_inner_val": int(len(val_rows)) if val_rows is not None else 0,
            "n_test": int(len(test_rows)),
            **({} if bags_seconds is None else {"bags_on_device_seconds": round(bags_seconds, 3)}),
            "epochs": trained.history,
        }
    )
    for setting in scored_settings:
        metrics, predictions = score_setting(held, setting, test_logits[setting], flags[setting])
        result.metrics.extend(metrics)
        result.predictions.append(predictions)
    return result, held


def save_fold(models_dir: Path, trained: Trained, data: FoldData, inputs: FoldInputs, held: HeldOut,
              cohort: Cohort, settings: Settings) -> None:
    """Write ``fold{k}.pt``, then delete the fold's saved training states (a larger ensemble's
    left-over members' included)."""
    omic_state, fold = data.omic_state, inputs.fold
    contents = {
        "model_spec": trained.spec,
        "omic_transform": omic_state.transform.state_dict() if omic_state else None,
        "time_bins": inputs.time_bins.state_dict(),
        "feature_names": omic_state.columns if omic_state else [],
        "omic_groups": omic_state.groups if omic_state else [],
        "wsi_dim": cohort.wsi_dim if data.uses_wsi else None,
        "train_median_risk": held.median_risk,
        "train_mean_survival": held.mean_survival.tolist(),
        "fold": fold,
        "train_patients": inputs.train_patients,
        "test_patients": inputs.test_patients,
        "training": dataclasses.asdict(settings.training),
        "run": dataclasses.asdict(settings.run),
    }
    write_checkpoint(models_dir / f"fold{fold}.pt", contents, trained.model)
    for path in [*models_dir.glob(f"unfinished-fold{fold}.pt"),
                 *models_dir.glob(f"unfinished-fold{fold}-member*.pt")]:
        path.unlink(missing_ok=True)


def run_fold(
    cohort: Cohort,
    model_name: str,
    fold: int,
    settings: Settings,
    device: torch.device,
    models_dir: Path,
    workers: int,
    cache_dir: Path | None = None,
) -> FoldResult:
    """Fit preprocessing, train, score and checkpoint one fold (``cache_dir``: decoded features)."""
    # saved states are large: those a killed save left under a temporary name go (only this fold's,
    # as the job that owns them; a writer still running is left alone)
    for name in (f"fold{fold}.pt", f"unfinished-fold{fold}.pt", f"unfinished-fold{fold}-member*.pt"):
        remove_stale_temporaries(models_dir / name)
    training = settings.training
    inputs = fold_inputs(cohort, fold, training.seed, settings.n_bins)
    data = fold_data(cohort, model_name, inputs, training, cache_dir)
    spec = fold_spec(model_name, cohort, data, settings)
    if model_name in LINEAR_MODELS:  # fitted in closed form on the whole training fold: no inner split
        rows = (data.fit_rows, None)
        trained = fit_closed_form(spec, data, inputs, settings, device, workers)
    else:
        rows = inner_split(data, inputs, training)
        trained = train_members(model_name, spec, data, inputs, rows, settings, device, models_dir, workers)
    result, held = score_fold(model_name, trained, data, inputs, rows, settings, device, workers)
    save_fold(models_dir, trained, data, inputs, held, cohort, settings)
    return result
