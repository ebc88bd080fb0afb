"""Fold-fitted preprocessing of the omic matrix: log, feature selection, imputation, scaling.

Used at training time, not by ``healnet omics``: ``healnet train`` fits one :class:`OmicTransform`
per fold on that fold's training patients (:mod:`healnet.training.fold`) and saves its state in the
fold checkpoint, from which the report's attention figures restore it. It lives here, beside the
omic tables it transforms, so that it depends on nothing in :mod:`healnet`.

Everything is learned from the rows passed to :meth:`OmicTransform.fit` (a fold's training
patients) and only applied to others, so validation values never shape the transform. Steps, per
column ``{modality}:{gene}``:

1. RNA log: ``log_rna="auto"`` applies ``log2(x + 1)`` to every ``rna:`` column when the training RNA
   values look un-logged: none negative and (maximum > 100 or pooled skewness > 3). Values already
   logged or z-scored (as in the MCAT tables, which hold negatives) are left alone. ``"always"`` /
   ``"never"`` force the choice. Negative inputs are clipped to 0 before a log.
2. Columns without any observed training value are dropped.
3. Selection (``max_features_per_modality``): per modality, the columns with the largest median
   absolute deviation (``select_by="mad"``) or variance of the training values are kept, in their
   original order. Binary ``mut:`` columns are ranked by variance under ``"mad"``, since their MAD is
   0 for any gene mutated in fewer than half of the patients. ``select_by="cox"`` ranks every column
   by the absolute z of its univariate Cox score test on the training patients' survival (``fit``
   then needs ``time`` and ``event``): a supervised screen, the usual remedy when a cohort has far
   fewer events than features. ``clin:`` columns are never dropped.
4. Imputation: missing values (a patient without that modality) get the training median (or mean).
5. Scaling: z-score with the training mean and standard deviation of the observed values
   (a standard deviation of 0 is replaced by 1). ``mut:`` columns stay 0/1 (not scaled) so that
   they keep their meaning; ``clin:`` columns are scaled like continuous omics.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import skew

log = logging.getLogger(__name__)

LOG_CHOICES = ("auto", "always", "never")
SELECT_CHOICES = ("mad", "variance", "cox")
IMPUTE_CHOICES = ("median", "mean")
BINARY_MODALITIES = ("mut",)
UNSELECTED_MODALITIES = ("clin",)


def modality_of(column: str) -> str:
    """The modality prefix of a ``{modality}:{gene}`` column; ValueError when there is none."""
    modality, sep, gene = str(column).partition(":")
    if not sep or not modality or not gene:
        raise ValueError(f"feature column {column!r} is not named {{modality}}:{{gene}}")
    return modality


def rna_looks_unlogged(values: np.ndarray) -> bool:
    """True when RNA values look like raw expression: none negative and max > 100 or skewness > 3."""
    observed = values[np.isfinite(values)]
    if observed.size == 0 or observed.min() < 0:
        return False
    if observed.max() > 100:
        return True
    return bool(observed.size > 2 and observed.std() > 0 and skew(observed) > 3)


def cox_score_z(values: np.ndarray, time: np.ndarray, event: np.ndarray) -> np.ndarray:
    """Per column, the z statistic of the univariate Cox score test (beta = 0; Breslow ties).

    ``values`` is patients x features (NaN: filled with the column median); the sign says whether
    higher values go with shorter survival. Risk-set sums come from one sort and cumulative sums,
    so the cost is O(n log n + n p) rather than O(n^2 p).
    """
    x = np.array(values, dtype=np.float64)
    fill = np.nanmedian(x, axis=0)
    x = np.where(np.isnan(x), np.where(np.isnan(fill), 0.0, fill), x)
    order = np.argsort(-time, kind="stable")  # longest first: a risk set is a prefix
    t, d, x = time[order], event[order] > 0, x[order]
    s0 = np.arange(1, len(t) + 1, dtype=np.float64)
    s1, s2 = np.cumsum(x, axis=0), np.cumsum(x * x, axis=0)
    # tied times share the risk set that includes all of them: the last index of each tie group
    last = np.searchsorted(-t, -t, side="right") - 1
    s0, s1, s2 = s0[last][:, None], s1[last], s2[last]
    mean = s1 / s0
    u = (x - mean)[d].sum(axis=0)
    info = (s2 / s0 - mean**2)[d].sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(info > 1e-12, u / np.sqrt(np.maximum(info, 1e-12)), 0.0)
    return z


class OmicTransform:
    """Per-fold omic preprocessing; see the module docstring for the steps and their order."""

    def __init__(
        self,
        log_rna: str = "auto",
        scale: bool = True,
        max_features_per_modality: int | None = None,
        select_by: str = "mad",
        impute: str = "median",
    ) -> None:
        if log_rna not in LOG_CHOICES:
            raise ValueError(f"log_rna must be one of {LOG_CHOICES}, got {log_rna!r}")
        if select_by not in SELECT_CHOICES:
            raise ValueError(f"select_by must be one of {SELECT_CHOICES}, got {select_by!r}")
        if impute not in IMPUTE_CHOICES:
            raise ValueError(f"impute must be one of {IMPUTE_CHOICES}, got {impute!r}")
        if max_features_per_modality is not None and max_features_per_modality < 1:
            raise ValueError("max_features_per_modality must be >= 1 or None")
        self.log_rna = log_rna
        self.scale = bool(scale)
        self.max_features_per_modality = max_features_per_modality
        self.select_by = select_by
        self.impute = impute
        self.log_rna_applied_: bool | None = None
        self.feature_names_: list[str] = []
        self.modalities_: dict[str, list[str]] = {}
        self.fill_: np.ndarray | None = None
        self.mean_: np.ndarray | None = None
        self.std_: np.ndarray | None = None

    # ------------------------------------------------------------------------------ fitting
    def _log(self, frame: pd.DataFrame) -> pd.DataFrame:
        if not self.log_rna_applied_:
            return frame
        rna = [c for c in frame.columns if modality_of(c) == "rna"]
        if rna:
            frame = frame.copy()
            frame[rna] = np.log2(np.clip(frame[rna].to_numpy(np.float64), 0, None) + 1.0)
        return frame

    def fit(  # noqa: N803 - X is the usual name for a design matrix
        self, X: pd.DataFrame, time: np.ndarray | None = None, event: np.ndarray | None = None
    ) -> OmicTransform:
        """Learn log decision, selected columns, fill values, means and stds from the rows of ``X``.

        ``time`` and ``event`` (one per row of ``X``) are needed only by ``select_by="cox"``.
        """
        if len(X) == 0:
            raise ValueError("cannot fit OmicTransform on zero rows")
        supervised = self.select_by == "cox" and self.max_features_per_modality is not None
        if supervised and (time is None or event is None or len(time) != len(X) or len(event) != len(X)):
            raise ValueError('select_by="cox" needs time and event for every row of X')
        frame = X.astype(np.float64)
        mods = {c: modality_of(c) for c in frame.columns}
        rna = [c for c, m in mods.items() if m == "rna"]
        if self.log_rna == "auto":
            self.log_rna_applied_ = bool(rna) and rna_looks_unlogged(frame[rna].to_numpy())
        else:
            self.log_rna_applied_ = self.log_rna == "always" and bool(rna)
        frame = self._log(frame)
        observed = frame.notna().any(axis=0)
        selected: dict[str, list[str]] = {}
        for modality in dict.fromkeys(mods.values()):
            cols = [c for c in frame.columns if mods[c] == modality and observed[c]]
            limit = self.max_features_per_modality
            if limit is not None and len(cols) > limit and modality not in UNSELECTED_MODALITIES:
                values = frame[cols].to_numpy()
                if supervised:
                    score = np.abs(cox_score_z(values, np.asarray(time, float), np.asarray(event, float)))
                elif self.select_by == "variance" or modality in BINARY_MODALITIES:
                    score = np.nanvar(values, axis=0)
                else:
                    score = np.nanmedian(np.abs(values - np.nanmedian(values, axis=0)), axis=0)
                keep = np.sort(np.argsort(-score, kind="stable")[:limit])
                cols = [cols[i] for i in keep]
            if cols:
                selected[modality] = cols
        self.modalities_ = selected
        self.feature_names_ = [c for cols in selected.values() for c in cols]
        values = frame[self.feature_names_].to_numpy()
        if values.shape[1] == 0:
            self.fill_ = self.mean_ = self.std_ = np.zeros(0)
            return self
        self.fill_ = np.nanmedian(values, axis=0) if self.impute == "median" else np.nanmean(values, axis=0)
        mean = np.nanmean(values, axis=0)
        std = np.nanstd(values, axis=0)
        std[~np.isfinite(std) | (std == 0)] = 1.0
        unscaled = np.array([mods[c] in BINARY_MODALITIES for c in self.feature_names_]) | (not self.scale)
        mean[unscaled] = 0.0
        std[unscaled] = 1.0
        self.mean_, self.std_ = mean, std
        return self

    def transform(self, X: pd.DataFrame) -> pd.DataFrame:  # noqa: N803
        """The selected columns of ``X``, logged, imputed and scaled; float32, no NaN, same index."""
        if self.fill_ is None:
            raise RuntimeError("OmicTransform is not fitted")
        absent = [c for c in self.feature_names_ if c not in X.columns]
        if absent:
            log.warning("%d fitted feature(s) absent from the data are imputed: %s", len(absent), absent[:5])
        frame = self._log(X.reindex(columns=self.feature_names_).astype(np.float64))
        values = frame.to_numpy(copy=True)
        missing = np.isnan(values)
        values[missing] = np.broadcast_to(self.fill_, values.shape)[missing]
        values = (values - self.mean_) / self.std_
        return pd.DataFrame(values.astype(np.float32), index=X.index, columns=list(self.feature_names_))

    def fit_transform(self, X: pd.DataFrame) -> pd.DataFrame:  # noqa: N803
        """``fit`` then ``transform`` the same rows."""
        return self.fit(X).transform(X)

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain python / numpy state, to save inside a training checkpoint."""
        if self.fill_ is None:
            raise RuntimeError("OmicTransform is not fitted")
        return {
            "params": {
                "log_rna": self.log_rna,
                "scale": self.scale,
                "max_features_per_modality": self.max_features_per_modality,
                "select_by": self.select_by,
                "impute": self.impute,
            },
            "log_rna_applied": bool(self.log_rna_applied_),
            "feature_names": list(self.feature_names_),
            "modalities": {m: list(c) for m, c in self.modalities_.items()},
            "fill": np.asarray(self.fill_, dtype=np.float64).copy(),
            "mean": np.asarray(self.mean_, dtype=np.float64).copy(),
            "std": np.asarray(self.std_, dtype=np.float64).copy(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> OmicTransform:
        """Rebuild a fitted transform from :meth:`state_dict`."""
        transform = cls(**state["params"])
        transform.log_rna_applied_ = bool(state["log_rna_applied"])
        transform.feature_names_ = list(state["feature_names"])
        transform.modalities_ = {m: list(c) for m, c in state["modalities"].items()}
        transform.fill_ = np.asarray(state["fill"], dtype=np.float64)
        transform.mean_ = np.asarray(state["mean"], dtype=np.float64)
        transform.std_ = np.asarray(state["std"], dtype=np.float64)
        n = len(transform.feature_names_)
        if not (transform.fill_.shape == transform.mean_.shape == transform.std_.shape == (n,)):
            raise ValueError("inconsistent OmicTransform state: array lengths differ from feature names")
        return transform


def fit_fold(features: pd.DataFrame, splits: pd.DataFrame, fold: int, **params: Any) -> OmicTransform:
    """An OmicTransform fitted on the training patients of ``fold`` that have omics (features' index)."""
    part = splits[(splits["fold"] == fold) & (splits["role"] == "train")]
    if part.empty:
        raise ValueError(f"no training patients in fold {fold}")
    train = features.index.intersection(pd.Index(part["patient"]))
    return OmicTransform(**params).fit(features.loc[train])
