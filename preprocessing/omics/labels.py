"""Discrete survival-time bins for the NLL survival loss, fitted on one fold's training patients only.

Used by both steps: ``healnet omics`` bins the whole cohort's times to balance the folds
(:mod:`preprocessing.omics.splits`) and lists each fold's cut points in its summary
(:func:`fold_time_bins`); ``healnet train`` fits one :class:`TimeBins` per fold for the loss's labels
(:mod:`healnet.training.fold`) and saves it in the fold checkpoint.

As in MCAT/HEALNet, the cut points are quantiles of the *uncensored* training times, and the outer
bins are open (a time below the first cut is bin 0, above the last cut bin ``n_bins - 1``), so
validation times outside the training range still get a bin. A time equal to a cut point falls into
the upper bin. With no uncensored training patient the quantiles of all training times are used
(logged), so a fold without deaths still has labels.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

log = logging.getLogger(__name__)


class TimeBins:
    """Quantile bins of survival time: ``fit`` on training patients, ``transform`` any times."""

    def __init__(self, n_bins: int = 4) -> None:
        if int(n_bins) < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        self.n_bins = int(n_bins)
        self.edges_: np.ndarray | None = None

    def fit(self, time: npt.ArrayLike, event: npt.ArrayLike) -> TimeBins:
        """Cut points at quantiles of the uncensored times (event == 1)."""
        time = np.asarray(time, dtype=np.float64)
        event = np.asarray(event).astype(bool)
        if time.shape != event.shape or time.ndim != 1 or time.size == 0:
            raise ValueError("time and event must be non-empty 1-D arrays of the same length")
        if np.isnan(time).any():
            raise ValueError("time contains NaN")
        basis = time[event]
        if basis.size == 0:
            log.warning("no uncensored patient to place time bins; using all %d times", time.size)
            basis = time
        inner = np.quantile(basis, np.linspace(0.0, 1.0, self.n_bins + 1)[1:-1])
        self.edges_ = np.concatenate([[-np.inf], inner, [np.inf]])
        return self

    @property
    def cuts_(self) -> list[float]:
        """The inner cut points (``n_bins - 1`` finite values)."""
        self._check()
        return [float(x) for x in self.edges_[1:-1]]

    def transform(self, time: npt.ArrayLike) -> np.ndarray:
        """Bin index (int64, 0..n_bins-1) of each time."""
        self._check()
        time = np.asarray(time, dtype=np.float64)
        return np.searchsorted(self.edges_[1:-1], time, side="right").astype(np.int64)

    def fit_transform(self, time: npt.ArrayLike, event: npt.ArrayLike) -> np.ndarray:
        """``fit`` then ``transform`` the same times."""
        return self.fit(time, event).transform(time)

    def state_dict(self) -> dict[str, Any]:
        """Plain-python state (to store inside a checkpoint)."""
        self._check()
        return {"n_bins": self.n_bins, "edges": [float(x) for x in self.edges_]}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TimeBins:
        """Rebuild a fitted TimeBins from :meth:`state_dict`."""
        bins = cls(int(state["n_bins"]))
        bins.edges_ = np.asarray(state["edges"], dtype=np.float64)
        if bins.edges_.shape != (bins.n_bins + 1,):
            raise ValueError(f"expected {bins.n_bins + 1} edges, got {bins.edges_.shape}")
        return bins

    def _check(self) -> None:
        if self.edges_ is None:
            raise RuntimeError("TimeBins is not fitted")


def fold_time_bins(manifest: pd.DataFrame, splits: pd.DataFrame, n_bins: int = 4) -> dict[int, TimeBins]:
    """Per fold, TimeBins fitted on that fold's training patients (from manifest time/event)."""
    labels = manifest.set_index("patient")[["time", "event"]]
    out: dict[int, TimeBins] = {}
    for fold, part in splits.groupby("fold", sort=True):
        train = labels.loc[part.loc[part["role"] == "train", "patient"]]
        out[int(fold)] = TimeBins(n_bins).fit(train["time"].to_numpy(), train["event"].to_numpy())
    return out
