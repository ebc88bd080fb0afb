"""Fitting the closed-form models (``coxph``) on one fold's training patients.

The model reads each patient's mean patch feature (every patch, as scoring reads bags) and the fold's
transformed omics; only the rows given, the training fold's, are read.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from healnet.data.bags import BagBatchSampler, BagDataset, checked_batches, make_loader
from healnet.models.coxph import CoxPH, mean_patch


@torch.no_grad()
def pooled_inputs(dataset: BagDataset, rows: Sequence[int], wsi_dim: int, device: torch.device,
                  workers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(mean patch feature ``[R, wsi_dim]``, has_wsi, omics ``[R, F]``, has_omics) of ``rows``."""
    rows = list(rows)
    means = np.zeros((len(rows), wsi_dim), np.float64)
    position = {r: i for i, r in enumerate(rows)}
    if dataset.read_wsi and wsi_dim:
        sampler = BagBatchSampler(rows, 1, shuffle=False, seed=0, sample=False)
        for batch in checked_batches(make_loader(dataset, sampler, workers)):
            if batch["wsi"] is None:  # a patient without slides: no patch to average
                continue
            idx = [position[int(r)] for r in batch["row"]]
            wsi = batch["wsi"].to(device)
            mask = batch["wsi_mask"].to(device) if batch["wsi_mask"] is not None else None
            means[idx] = mean_patch(wsi, mask, len(idx), torch.zeros(wsi_dim, device=device)).cpu().numpy()
    return means, dataset.has_wsi[rows].copy(), dataset.omics[rows].copy(), dataset.has_omics[rows].copy()


def fit_linear(model: CoxPH, dataset: BagDataset, rows: np.ndarray, knots: np.ndarray,
               device: torch.device, workers: int) -> list[dict[str, float]]:
    """Fit ``model`` on the patients of ``rows`` (the training fold); returns its one-entry history."""
    wsi_dim = model.wsi_mean.shape[0]
    means, has_wsi, omics, has_omics = pooled_inputs(dataset, rows, wsi_dim, device, workers)
    fitted = model.fit_from(means, has_wsi, omics, has_omics, dataset.times[rows], dataset.events[rows],
                            knots)
    return [{"epoch": 0, **fitted}]
