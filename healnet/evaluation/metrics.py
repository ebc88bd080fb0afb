"""Survival metrics of one fold: c-index, IPCW c-index, integrated Brier score, time-dependent AUC,
and the integrated Brier score of the training patients' Kaplan-Meier curve on the same patients and
times: a yardstick, since a model whose score is above it predicts survival worse than a curve that
ignores every input.

All come from scikit-survival. Censoring weights are estimated on the fold's training patients, so
evaluation is restricted to their follow-up range: test times at or beyond the largest training time
are censored there (the patient is known to be alive at that point), and the time grid for the Brier
score and AUC lies inside both follow-up ranges. A metric that is undefined on a fold (no events, no
comparable pairs, no usable time grid) is recorded as NaN with a note instead of stopping the run.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sksurv.metrics import (
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from sksurv.nonparametric import kaplan_meier_estimator
from sksurv.util import Surv

METRICS = ("c_index", "ipcw_c_index", "ibs", "td_auc", "ibs_kaplan_meier")


def c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's c-index of ``risk`` (higher = worse prognosis); a ValueError when it is undefined: no
    event, or no comparable pair (scikit-survival's NoComparablePairException is a ValueError)."""
    event = np.asarray(event).astype(bool)
    if not event.any():
        raise ValueError("no events in the evaluation fold")
    time, risk = np.asarray(time, dtype=float), np.asarray(risk, dtype=float)
    return float(concordance_index_censored(event, time, risk)[0])


def survival_knots(edges: np.ndarray, n_bins: int, t_max: float) -> np.ndarray:
    """Times at which the discrete survival curve reaches ``1, S_0, ..., S_{K-1}`` (K + 1 knots).

    ``edges`` are the time-bin boundaries (K + 1 values, or the K - 1 inner cut points); infinite or
    negative outer edges are replaced by 0 and ``t_max`` (the largest training time).
    """
    edges = np.asarray(edges, dtype=float).ravel()
    if len(edges) == n_bins - 1:
        edges = np.concatenate([[0.0], edges, [t_max]])
    if len(edges) != n_bins + 1:
        raise ValueError(f"expected {n_bins + 1} bin edges, got {len(edges)}")
    edges = edges.copy()
    edges[0] = edges[0] if np.isfinite(edges[0]) and edges[0] > 0 else 0.0
    finite = np.isfinite(edges)
    edges[~finite] = max(t_max, edges[finite].max())
    return np.maximum.accumulate(edges)


def survival_at(surv_bins: np.ndarray, knots: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Survival probabilities ``[patients, times]``: the discrete curve, linear between bin boundaries.

    ``surv_bins`` ``[patients, K]`` holds ``S_k`` (survival past bin k); the curve starts at 1 at the
    first boundary and is flat after the last one.
    """
    surv_bins = np.atleast_2d(surv_bins)
    curve = np.concatenate([np.ones((len(surv_bins), 1)), surv_bins], axis=1)
    return np.stack([np.interp(times, knots, row) for row in curve])


def evaluation_times(train_time: np.ndarray, test_time: np.ndarray, n: int = 15) -> np.ndarray:
    """A grid of quantiles (10 % to 90 %) of the test times, strictly inside both follow-up ranges."""
    lo = max(test_time.min(), train_time.min())
    hi = min(test_time.max(), train_time.max())
    grid = np.unique(np.quantile(test_time, np.linspace(0.1, 0.9, n)))
    return grid[(grid >= lo) & (grid < hi)]


def fold_metrics(
    train_time: np.ndarray,
    train_event: np.ndarray,
    test_time: np.ndarray,
    test_event: np.ndarray,
    risk: np.ndarray,
    survival_fn: Callable[[np.ndarray], np.ndarray] | None = None,
) -> list[dict[str, object]]:
    """Every metric of :data:`METRICS` on one fold: ``[{metric, value, note}]`` (NaN + note if undefined).

    ``risk``: higher = worse prognosis. ``survival_fn(times) -> [patients, times]`` gives survival
    probabilities for the integrated Brier score (skipped, NaN, when None).
    """
    train_time = np.asarray(train_time, dtype=float)
    train_event = np.asarray(train_event).astype(bool)
    test_time = np.asarray(test_time, dtype=float)
    test_event = np.asarray(test_event).astype(bool)
    risk = np.asarray(risk, dtype=float)
    results: list[dict[str, object]] = []

    def record(metric: str, compute: Callable[[], float]) -> None:
        try:
            value, note = float(compute()), ""
            if not np.isfinite(value):
                value, note = float("nan"), "not finite"
        except (ValueError, ZeroDivisionError, IndexError) as err:
            value, note = float("nan"), str(err).splitlines()[0][:200]
        results.append({"metric": metric, "value": value, "note": note})

    record("c_index", lambda: c_index(test_time, test_event, risk))

    # censor test patients at the end of training follow-up (censoring weights are unknown beyond it)
    t_max = train_time.max() if len(train_time) else 0.0
    beyond = test_time >= t_max
    clipped_time = np.where(beyond, t_max, test_time)
    clipped_event = test_event & ~beyond
    y_train = Surv.from_arrays(train_event, train_time)
    y_test = Surv.from_arrays(clipped_event, clipped_time)

    def ipcw() -> float:
        if not clipped_event.any():
            raise ValueError("no events within the training follow-up range")
        return concordance_index_ipcw(y_train, y_test, risk, tau=t_max)[0]

    record("ipcw_c_index", ipcw)
    times = evaluation_times(train_time, clipped_time) if len(test_time) else np.array([])

    def ibs() -> float:
        if survival_fn is None:
            raise ValueError("no survival function")
        if len(times) < 2:
            raise ValueError("fewer than two evaluation times inside both follow-up ranges")
        return integrated_brier_score(y_train, y_test, survival_fn(times), times)

    def td_auc() -> float:
        if not clipped_event.any():
            raise ValueError("no events within the training follow-up range")
        usable = times[(times >= clipped_time[clipped_event].min()) & (times < clipped_time.max())]
        if len(usable) == 0:
            raise ValueError("no evaluation time with both cases and controls")
        return cumulative_dynamic_auc(y_train, y_test, risk, usable)[1]

    def ibs_kaplan_meier() -> float:
        if len(times) < 2:
            raise ValueError("fewer than two evaluation times inside both follow-up ranges")
        km_time, km_surv = kaplan_meier_estimator(train_event, train_time)
        at = np.searchsorted(km_time, times, side="right") - 1  # the step function; 1 before the first time
        curve = np.where(at >= 0, km_surv[np.maximum(at, 0)], 1.0)
        return integrated_brier_score(y_train, y_test, np.tile(curve, (len(test_time), 1)), times)

    record("ibs", ibs)
    record("td_auc", td_auc)
    record("ibs_kaplan_meier", ibs_kaplan_meier)
    return results
