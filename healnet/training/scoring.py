"""Scoring a trained model: hazard logits per missing-modality setting, the inner-validation score that
early stopping ranks epochs by, and the held-out patients' metrics and predictions of one setting.

Settings: ``full`` (every modality a patient has) and, for multimodal models, ``omics_only``,
``wsi_only`` and ``random_half`` (each patient with both modalities loses one at random, seeded).
Patients a model cannot score in a setting (a unimodal model's patients without its modality, or
anyone left without any modality) get the training-median risk and the training-mean survival curve,
so every model is evaluated on the same patients; ``n_imputed`` counts them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from healnet.data.bags import BagBatchSampler, BagDataset, checked_batches, make_loader
from healnet.evaluation.metrics import c_index, fold_metrics, survival_at
from healnet.modalities import MULTIMODAL
from healnet.models.loss import nll_survival_loss, risk_from_logits, survival_from_logits

log = logging.getLogger(__name__)

SETTINGS = ("full", "omics_only", "wsi_only", "random_half")
# (has_wsi, has_omics) per patient: which modalities a model may read in a setting
Flags = tuple[np.ndarray, np.ndarray]


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A loader batch with its tensors moved to ``device``."""
    return {
        k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
    }


def forward(
    model: torch.nn.Module,
    batch: dict[str, Any],
    has_wsi: torch.Tensor | None = None,
    has_omics: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hazard logits of a batch, with the batch's modality flags unless others are given."""
    return model(
        batch["wsi"],
        batch["wsi_mask"],
        batch["omics"],
        batch["has_wsi"] if has_wsi is None else has_wsi,
        batch["has_omics"] if has_omics is None else has_omics,
        wsi_coords=batch["coords"],
    )


def setting_flags(setting: str, has_wsi: np.ndarray, has_omics: np.ndarray, rng_seed: Sequence[int]) -> Flags:
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


def all_flags(dataset: BagDataset, rows: Sequence[int]) -> Flags:
    """Every modality the patients of ``rows`` have (the ``full`` setting)."""
    rows = list(rows)
    return dataset.has_wsi[rows].copy(), dataset.has_omics[rows].copy()


def model_n_bins(model: torch.nn.Module) -> int:
    """Number of hazard outputs of a model (its ``n_bins``, or its last Linear layer's width)."""
    if isinstance(getattr(model, "n_bins", None), int):
        return model.n_bins
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    return last.out_features


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    dataset: BagDataset,
    rows: Sequence[int],
    device: torch.device,
    flags: dict[str, Flags],
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
        batch = to_device(batch, device)
        idx = [position[int(r)] for r in batch["row"]]
        for setting, (has_wsi, has_omics) in flags.items():
            hw = torch.as_tensor(has_wsi[idx], device=device) & batch["has_wsi"]
            ho = torch.as_tensor(has_omics[idx], device=device) & batch["has_omics"]
            if bool((hw | ho).any()):  # else nothing to read: the caller imputes these patients
                out[setting][idx] = forward(model, batch, hw, ho).float().cpu().numpy()
    return out


def inner_val_score(dataset: BagDataset, rows: np.ndarray, logits: np.ndarray, alpha: float
                    ) -> dict[str, float]:
    """What early stopping ranks epochs by: the inner-validation c-index, or, where it is undefined
    (a small split without a comparable pair), minus the validation NLL, so that the kept epoch is
    still the best on held-out data rather than the first one."""
    risk = risk_from_logits(torch.from_numpy(logits)).numpy()
    try:
        c = c_index(dataset.times[rows], dataset.events[rows], risk)
    except ValueError:  # no death, or no death before another's time
        c = float("nan")
    if np.isfinite(c):
        return {"inner_val_c_index": c, "score": c}
    nll = float(nll_survival_loss(torch.from_numpy(logits), torch.as_tensor(dataset.bins[rows]),
                                  torch.as_tensor(dataset.events[rows]), alpha=alpha))
    return {"inner_val_c_index": c, "inner_val_nll": nll, "score": -nll}


@dataclass(frozen=True)
class HeldOut:
    """What scoring one fold's held-out patients needs besides the model's outputs: who they are, the
    survival data of both sides, the knots of the survival curves, and the training fold's median
    risk and mean survival curve, which stand in for a patient the model cannot score."""

    model_name: str
    fold: int
    uses_wsi: bool
    patients: list[str]
    train_time: np.ndarray
    train_event: np.ndarray
    time: np.ndarray
    event: np.ndarray
    knots: np.ndarray
    median_risk: float
    mean_survival: np.ndarray


def score_setting(
    held: HeldOut, setting: str, logits: np.ndarray, flags: Flags
) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """The ``folds.csv`` rows and the predictions of one setting (imputed patients included)."""
    hw, ho = flags
    scored = (hw | ho) if held.model_name in MULTIMODAL else (hw if held.uses_wsi else ho)
    surv = survival_from_logits(torch.from_numpy(logits)).numpy()
    surv[~scored] = held.mean_survival
    risk = -surv.sum(-1)
    risk[~scored] = held.median_risk
    rows = fold_metrics(held.train_time, held.train_event, held.time, held.event, risk,
                        lambda grid, s=surv: survival_at(s, held.knots, grid))
    counts = {"n_patients": len(held.patients), "n_events": int(held.event.sum()),
              "n_imputed": int((~scored).sum())}
    metrics = [{"model": held.model_name, "fold": held.fold, "setting": setting, **row, **counts}
               for row in rows]
    predictions = pd.DataFrame(
        {
            "patient": held.patients,
            "fold": held.fold,
            "setting": setting,
            "risk": risk,
            "time": held.time,
            "event": held.event,
            "train_median_risk": held.median_risk,
            "imputed": ~scored,
        }
    )
    log.info("fold %d %s c-index %.4f", held.fold, setting, rows[0]["value"])
    return metrics, predictions
