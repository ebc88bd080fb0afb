"""A penalised Cox proportional-hazards model in the harness (``coxph``): the linear yardstick the
deep models have to beat.

Inputs per patient: the fold's screened omic vector (scaled by the fold's omic transform) and the
first ``components`` principal components of the mean of the patient's patch features, each standardised
on the training fold; a modality the patient lacks (or a setting removes) enters as zeros, the
training fold's mean. The coefficients are a ridge-penalised Cox fit (scikit-survival's
``CoxPHSurvivalAnalysis``, ``alpha = penalty``) on the training fold only; the baseline cumulative
hazard is Breslow's. The survival curve ``S(t | x) = exp(-H0(t) exp(x b))`` at the fold's time-bin
boundaries becomes the discrete-time hazard logits every other model outputs, so scoring, the
missing-modality settings, checkpoints and the report treat it like them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

#: smallest hazard kept away from 0 and 1 before taking logits
_EPS = 1e-6


class CoxPH(nn.Module):
    """The fitted linear Cox model; :meth:`fit_from` sets its buffers, ``forward`` gives hazard logits."""

    def __init__(self, *, wsi_dim: int | None, n_omics: int | None, n_bins: int, components: int,
                 penalty: float) -> None:
        super().__init__()
        self.n_bins, self.penalty = n_bins, penalty
        k = min(components, wsi_dim) if wsi_dim else 0
        self.register_buffer("wsi_mean", torch.zeros(wsi_dim or 0))
        self.register_buffer("wsi_axes", torch.zeros(wsi_dim or 0, k))  # PCA axes, scaled to unit variance
        self.register_buffer("coef", torch.zeros(k + (n_omics or 0)))
        self.register_buffer("log_h0", torch.full((n_bins,), -30.0))  # log H0 at the bins' right edges

    def l1_penalty(self) -> Tensor:
        """No gradient training: no L1 term (the trainer's interface)."""
        return self.coef.new_zeros(())

    def inputs(self, wsi_mean: Tensor, omics: Tensor, has_wsi: Tensor, has_omics: Tensor) -> Tensor:
        """The Cox covariates ``[B, k + F]``: PCA scores of the mean patch feature, then the omics;
        zeros for a modality a patient does not have."""
        parts = []
        if self.wsi_axes.shape[1]:
            scores = (wsi_mean.float() - self.wsi_mean) @ self.wsi_axes
            parts.append(scores * has_wsi[:, None].float())
        if len(self.coef) > self.wsi_axes.shape[1]:
            parts.append(omics.float() * has_omics[:, None].float())
        return torch.cat(parts, dim=1)

    def forward(self, wsi: Tensor | None, wsi_mask: Tensor | None, omics: Tensor | None, has_wsi: Tensor,
                has_omics: Tensor, return_attention: bool = False,
                wsi_coords: Tensor | None = None) -> Tensor:
        """Hazard logits ``[B, n_bins]`` of the Cox survival curve (the harness's call signature)."""
        n = len(has_wsi)
        mean = mean_patch(wsi, wsi_mask, n, self.wsi_mean)
        x = self.inputs(mean, omics if omics is not None else self.coef.new_zeros(n, 0), has_wsi, has_omics)
        cumulative = torch.exp(self.log_h0[None, :] + (x @ self.coef)[:, None])  # H(t_k | x)
        survival = torch.exp(-cumulative)
        previous = torch.cat([torch.ones_like(survival[:, :1]), survival[:, :-1]], dim=1)
        hazard = (1 - survival / previous.clamp_min(1e-30)).clamp(_EPS, 1 - _EPS)
        return torch.log(hazard) - torch.log1p(-hazard)

    def fit_from(self, wsi_mean: np.ndarray, has_wsi: np.ndarray, omics: np.ndarray, has_omics: np.ndarray,
                 time: np.ndarray, event: np.ndarray, knots: np.ndarray) -> dict[str, float]:
        """Fit PCA, coefficients and baseline hazard on the training patients given; ``knots``: the
        fold's K + 1 bin boundaries (:func:`healnet.evaluation.metrics.survival_knots`)."""
        k = self.wsi_axes.shape[1]
        if k and has_wsi.any():
            self._fit_pca(wsi_mean[has_wsi], k)
        x = self.inputs(torch.as_tensor(wsi_mean), torch.as_tensor(omics), torch.as_tensor(has_wsi),
                        torch.as_tensor(has_omics)).double().numpy()
        coef = ridge_cox(x, time, event, self.penalty)
        eta = x @ coef
        self.coef.copy_(torch.as_tensor(coef))
        h0 = breslow(eta, time, event, np.asarray(knots, float)[1:])
        self.log_h0.copy_(torch.as_tensor(np.log(np.maximum(h0, 1e-12))))
        return {"train_c_index_linear": float(_harrell(time, event, eta)), "n_fit": int(len(time))}

    def _fit_pca(self, means: np.ndarray, k: int) -> None:
        centre = means.mean(0)
        _, s, vt = np.linalg.svd(means - centre, full_matrices=False)
        sd = s[:k] / np.sqrt(max(len(means) - 1, 1))
        axes = vt[:k].T / np.where(sd > 0, sd, 1.0)
        self.wsi_mean.copy_(torch.as_tensor(centre))
        self.wsi_axes.zero_()
        self.wsi_axes[:, : axes.shape[1]] = torch.as_tensor(axes)


def mean_patch(wsi: Tensor | None, wsi_mask: Tensor | None, n: int, like: Tensor) -> Tensor:
    """Each patient's mean patch feature ``[B, D]`` over its real (unpadded) patches."""
    if wsi is None or wsi.shape[-1] == 0:
        return like.new_zeros(n, like.shape[0])
    mask = torch.ones(wsi.shape[:2], dtype=torch.bool, device=wsi.device) if wsi_mask is None else wsi_mask
    weights = mask.float()[..., None]
    return (wsi.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def ridge_cox(x: np.ndarray, time: np.ndarray, event: np.ndarray, penalty: float) -> np.ndarray:
    """Coefficients of a ridge-penalised Cox fit (Breslow ties); zeros when nothing can be fitted."""
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    if x.shape[1] == 0 or not np.asarray(event).any():
        return np.zeros(x.shape[1])
    model = CoxPHSurvivalAnalysis(alpha=penalty, ties="breslow")
    model.fit(x, Surv.from_arrays(np.asarray(event, bool), np.asarray(time, float)))
    return np.asarray(model.coef_, float)


def breslow(eta: np.ndarray, time: np.ndarray, event: np.ndarray, at: Sequence[float]) -> np.ndarray:
    """Breslow's baseline cumulative hazard ``H0(t)`` at the times ``at``."""
    risk = np.exp(eta - eta.max())
    scale = np.exp(eta.max())
    deaths = np.unique(time[event.astype(bool)])
    steps = np.array([event[time == t].sum() / (risk[time >= t].sum() * scale) for t in deaths])
    return np.array([steps[deaths <= t].sum() for t in at])


def _harrell(time: np.ndarray, event: np.ndarray, eta: np.ndarray) -> float:
    from healnet.evaluation.metrics import c_index

    try:
        return c_index(time, event, eta)
    except ValueError:
        return float("nan")
