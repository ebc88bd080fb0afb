"""Discrete-time survival: negative log-likelihood for censored data, survival curves, risk scores.

The model gives one logit per time bin; ``h_k = sigmoid(logit_k)`` is the hazard (probability of the
event in bin k given survival to its start) and ``S_k = prod_{j<=k} (1 - h_j)`` the probability of
surviving past bin k (``S_{-1} = 1``). For a patient in bin ``y``:

- event observed (``event = 1``): ``L_unc = -log S_{y-1} - log h_y``;
- censored (``event = 0``): ``L_cens = -log S_y``.

Loss per patient, MCAT convention (Chen et al. 2021, ``nll_loss``): ``(1 - alpha) * (L_unc + L_cens)
+ alpha * L_unc`` (L_cens is zero for an event and L_unc zero for a censored patient), i.e. censored
patients are down-weighted by ``1 - alpha``; alpha = 0 is the plain likelihood. The batch loss is the mean
over patients, each optionally multiplied by a weight (e.g. inverse bin frequency, mean 1 over the
training set). Logs are computed with log-sigmoid, so no epsilon clamping is needed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def survival_from_logits(logits: Tensor) -> Tensor:
    """``S_k = prod_{j<=k} (1 - sigmoid(logit_j))``, shape ``[B, n_bins]``."""
    return torch.exp(torch.cumsum(F.logsigmoid(-logits), dim=-1))


def risk_from_logits(logits: Tensor) -> Tensor:
    """Risk score ``-sum_k S_k`` (higher = shorter expected survival), shape ``[B]``."""
    return -survival_from_logits(logits).sum(dim=-1)


def nll_survival_loss(
    logits: Tensor, bins: Tensor, events: Tensor, alpha: float = 0.4, weights: Tensor | None = None
) -> Tensor:
    """Mean discrete-time NLL over the batch (see module docstring for the exact formula).

    ``logits`` ``[B, n_bins]``, ``bins`` ``[B]`` int (0-based time bin), ``events`` ``[B]`` (1 = death,
    0 = censored), ``weights`` ``[B]`` optional per-patient weights.
    """
    bins = bins.long().view(-1, 1)
    events = events.float().view(-1)
    log_h = F.logsigmoid(logits)  # log h_k
    log_s = torch.cumsum(F.logsigmoid(-logits), dim=-1)  # log S_k
    log_s_pad = torch.cat([torch.zeros_like(log_s[:, :1]), log_s], dim=-1)  # log S_{k-1}, k = 0..K
    log_s_before = log_s_pad.gather(1, bins).view(-1)  # log S_{y-1}
    log_s_at = log_s_pad.gather(1, bins + 1).view(-1)  # log S_y
    log_h_at = log_h.gather(1, bins).view(-1)
    uncensored = -events * (log_s_before + log_h_at)
    censored = -(1 - events) * log_s_at
    loss = (1 - alpha) * (censored + uncensored) + alpha * uncensored
    if weights is not None:
        loss = loss * weights.float().view(-1)
    return loss.mean()


def inverse_frequency_weights(bins: np.ndarray, n_bins: int) -> np.ndarray:
    """Per-patient weights ``n / (n_bins_present * count(bin))``, mean 1 over the given patients."""
    bins = np.asarray(bins, dtype=int)
    counts = np.bincount(bins, minlength=n_bins).astype(float)
    present = int((counts > 0).sum())
    w = len(bins) / (present * counts[bins])
    return (w / w.mean()).astype(np.float32)
