"""The report's survival figures and failed-slide table for one cohort (``healnet report``, see
:mod:`healnet.report.cli`).

- ``km_curves.png``: Kaplan-Meier curves of held-out patients, split at each fold's training-median risk,
  with the log-rank p-value (lifelines), one panel per model;
- ``c_index.png``: c-index per model with one point per fold;
- ``failed_slides.csv`` (beside the figures folder): slides that gave no patches, and why.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from healnet.data.results import read_predictions, split_run  # noqa: E402
from healnet.report.figure_files import message_figure, save_figure  # noqa: E402
from preprocessing.core.atomic import atomic_output  # noqa: E402
from preprocessing.core.errors import InputError, one_line  # noqa: E402
from preprocessing.features.store import store_attrs  # noqa: E402
from preprocessing.tiling.tiles import read_tiles  # noqa: E402

log = logging.getLogger(__name__)


def load_predictions(results_dir: Path, runs: list[str]) -> pd.DataFrame:
    """The held-out predictions of every ``{encoder}/{model}`` run in one frame (columns ``model`` and
    ``encoder`` added)."""
    frames = []
    for run in runs:
        encoder, model = split_run(run)
        frames.append(read_predictions(results_dir / run / "predictions.parquet").assign(model=model,
                                                                                           encoder=encoder))
    return pd.concat(frames, ignore_index=True)


def plot_km_curves(predictions: pd.DataFrame, path: Path, setting: str = "full") -> pd.DataFrame:
    """Kaplan-Meier curves of predicted high vs low risk per model; returns the log-rank table."""
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test

    preds = predictions[predictions["setting"] == setting]
    models = list(dict.fromkeys(preds["model"]))
    if not models:
        message_figure(path, "Kaplan-Meier curves", f"no predictions for setting {setting!r}")
        return pd.DataFrame()
    ncols = min(3, len(models))
    nrows = int(np.ceil(len(models) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.9 * nrows), squeeze=False,
                             layout="constrained")
    # Room between rows, so that a panel title never touches the x-axis label of the panel above.
    fig.get_layout_engine().set(h_pad=0.12, hspace=0.12, w_pad=0.08)
    rows = []
    for ax, model in zip(axes.flat, models, strict=False):
        p = preds[preds["model"] == model]
        # a patient the model could not score (no modality it reads) got the training median as a
        # stand-in risk: it belongs to neither predicted group
        unscored = p["imputed"].to_numpy(bool) if "imputed" in p else np.zeros(len(p), bool)
        p = p[~unscored]
        high = p["risk"].to_numpy() > p["train_median_risk"].to_numpy()
        for mask, label, colour in [(~high, "low risk", "tab:blue"), (high, "high risk", "tab:red")]:
            if mask.any():
                km = KaplanMeierFitter(label=f"{label} (n={int(mask.sum())})")
                km.fit(p["time"][mask], p["event"][mask])
                km.plot_survival_function(ax=ax, ci_show=False, color=colour)
        pval = np.nan
        t, e = p["time"], p["event"]
        if high.any() and (~high).any():
            pval = logrank_test(t[high], t[~high], e[high], e[~high]).p_value
        rows.append({"model": model, "n_high": int(high.sum()), "n_low": int((~high).sum()),
                     "n_unscored": int(unscored.sum()), "logrank_p": pval})
        ax.set_title(f"{model}: log-rank p = {pval:.3g}")
        ax.set_xlabel("time (months)")
        ax.set_ylabel("survival probability")
        ax.set_ylim(0, 1.05)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    fig.suptitle("Held-out patients split at the training-median predicted risk "
                 "(patients a model could not score left out)")
    save_figure(fig, path)
    return pd.DataFrame(rows)


def plot_c_index(folds: pd.DataFrame, path: Path, setting: str = "full") -> None:
    """c-index per model: one dot per fold, a bar for the mean, chance level dashed."""
    sel = folds[(folds["metric"] == "c_index") & (folds["setting"] == setting)]
    models = list(dict.fromkeys(sel["model"]))
    fig, ax = plt.subplots(figsize=(1.4 * max(3, len(models)) + 1, 3.8))
    rng = np.random.default_rng(0)
    for i, model in enumerate(models):
        values = sel.loc[sel["model"] == model, "value"].to_numpy(dtype=float)
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, color="tab:gray", zorder=3, s=18)
        mean = np.nanmean(values)
        ax.hlines(mean, i - 0.3, i + 0.3, color="tab:red", lw=2, zorder=4)
        # The mean's value right of its bar: the fold dots stay within +-0.12 of the model's x.
        ax.annotate(f"{mean:.3f}", (i + 0.3, mean), xytext=(3, 0), textcoords="offset points",
                    ha="left", va="center", fontsize=8, color="tab:red", zorder=5,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})
    ax.axhline(0.5, ls="--", color="k", lw=0.8)
    ax.set_xticks(range(len(models)), models)
    ax.set_xlim(-0.5, len(models) - 0.5 + 0.25)
    ax.set_ylabel("c-index (held-out fold)")
    ax.set_title("c-index per model: folds (dots) and mean (red)")
    save_figure(fig, path)


def failed_slides(
    tiles_dir: Path, features_dir: Path | None = None, slides: set[str] | None = None
) -> pd.DataFrame:
    """Slides whose tiling failed or gave no patches, or whose patches could not be embedded (a store
    recorded as ``failed``), with the reason (empty frame when none).

    ``slides``: the stems of the cohort's slides now. Tiles of a slide that has since left the
    slides folder stay on disk (no job owns them any more) and are not listed.
    """
    rows = []
    for path in sorted(tiles_dir.glob("*.parquet")) if tiles_dir.is_dir() else []:
        slide = path.name[: -len(".parquet")]
        if slides is not None and slide not in slides:
            continue
        try:
            tiles, meta = read_tiles(path)
        except Exception as err:  # noqa: BLE001 - as the omics step: an unreadable file is a failed slide
            reason = f"tiles file unreadable ({one_line(err)})"
            rows.append({"slide": slide, "patient": slide[:12], "status": "failed", "reason": reason})
            continue
        if meta.get("failed"):
            rows.append({"slide": slide, "patient": slide[:12], "status": "failed", "reason": meta["failed"]})
        elif len(tiles) == 0:
            reason = meta.get("warning") or "no patch passed the tissue threshold"
            rows.append({"slide": slide, "patient": slide[:12], "status": "no patches", "reason": reason})
        elif features_dir is not None and (reason := _extraction_failure(features_dir / f"{slide}.zarr")):
            rows.append({"slide": slide, "patient": slide[:12], "status": "failed", "reason": reason})
    return pd.DataFrame(rows, columns=["slide", "patient", "status", "reason"])


def _extraction_failure(store: Path) -> str | None:
    """Why extraction recorded this store as failed (``on_slide_error: record``), else None."""
    if not store.is_dir():
        return None
    try:
        return store_attrs(store).get("failed")
    except InputError:  # a store that cannot be opened is training's error to report
        return None


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write a CSV atomically."""
    with atomic_output(path) as tmp:
        frame.to_csv(tmp, index=False)
