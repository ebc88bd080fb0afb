"""Per-cohort summary of every trained model: ``healnet evaluate``.

Reads ``RESULTS_DIR/{model}/folds.csv`` and writes one row per model x setting with the mean, standard
deviation (population, ddof = 0, over folds, NaN folds left out) and per-fold values of each metric,
as CSV, as a Markdown table (mean ± std) and as a small self-contained HTML page with the same table
(the Snakemake report shows HTML in the page; a CSV is only offered as a download), all written
atomically.
"""

from __future__ import annotations

import argparse
import html
from pathlib import Path

import numpy as np
import pandas as pd

from healnet.metrics import METRICS
from preprocessing.atomic import atomic_output
from preprocessing.errors import InputError

SETTING_ORDER = ("full", "omics_only", "wsi_only", "random_half")
FOLD_COLUMNS = ("model", "fold", "setting", "metric", "value")


def read_folds(results_dir: Path, models: list[str] | None) -> pd.DataFrame:
    """All ``folds.csv`` tables of a cohort (the given models, or every subfolder that has one)."""
    if not results_dir.is_dir():
        raise InputError(results_dir, "results folder does not exist")
    if models is None:
        models = sorted(p.parent.name for p in results_dir.glob("*/folds.csv"))
        if not models:
            raise InputError(results_dir, "no {model}/folds.csv found")
    frames = []
    for model in models:
        path = results_dir / model / "folds.csv"
        if not path.is_file():
            raise InputError(path, f"missing: train model {model} first")
        try:
            frame = pd.read_csv(path)
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise InputError(path, f"cannot read CSV: {err}") from err
        missing = [c for c in FOLD_COLUMNS if c not in frame.columns]
        if missing:
            raise InputError(path, f"missing columns {missing}")
        frames.append(frame.assign(model=model))
    return pd.concat(frames, ignore_index=True)


def summarise(folds: pd.DataFrame) -> pd.DataFrame:
    """One row per model x setting: ``{metric}_mean``, ``{metric}_std``, ``c_index_folds``, ``n_folds``."""
    rows = []
    for (model, setting), group in folds.groupby(["model", "setting"], sort=False):
        row: dict[str, object] = {"model": model, "setting": setting}
        for metric in METRICS:
            values = group.loc[group["metric"] == metric].sort_values("fold")["value"].astype(float)
            finite = values[np.isfinite(values)]
            row[f"{metric}_mean"] = float(finite.mean()) if len(finite) else float("nan")
            row[f"{metric}_std"] = float(finite.std(ddof=0)) if len(finite) else float("nan")
            if metric == "c_index":
                row["c_index_folds"] = ";".join(f"{v:.4f}" for v in values)
        row["n_folds"] = int(group["fold"].nunique())
        rows.append(row)
    table = pd.DataFrame(rows)
    order = {s: i for i, s in enumerate(SETTING_ORDER)}
    table["_setting"] = table["setting"].map(lambda s: order.get(s, len(order)))
    table = table.sort_values(["_setting", "c_index_mean", "model"], ascending=[True, False, True])
    columns = [
        "model",
        "setting",
        "c_index_mean",
        "c_index_std",
        "c_index_folds",
        "ipcw_c_index_mean",
        "ipcw_c_index_std",
        "ibs_mean",
        "ibs_std",
        "td_auc_mean",
        "td_auc_std",
        "n_folds",
    ]
    return table[columns].reset_index(drop=True)


SUMMARY_HEADER = ("model", "setting", "c-index", "IPCW c-index", "integrated Brier", "td AUC", "folds")
SUMMARY_NOTE = (
    "Mean ± standard deviation over folds (ddof = 0; folds where a metric is undefined are left out). "
    "Lower is better for the integrated Brier score, higher for the others."
)
METRIC_PREFIXES = ("c_index", "ipcw_c_index", "ibs", "td_auc")


def summary_cells(row: pd.Series) -> list[str]:
    """One summary row as the table's texts: model, setting, mean ± std per metric, folds."""
    metrics = [
        "n/a" if not np.isfinite(row[f"{m}_mean"]) else f"{row[f'{m}_mean']:.3f} ± {row[f'{m}_std']:.3f}"
        for m in METRIC_PREFIXES
    ]
    return [str(row["model"]), str(row["setting"]), *metrics, str(row["n_folds"])]


def to_markdown(summary: pd.DataFrame, cohort: str) -> str:
    """A Markdown table, mean ± std per metric, settings in a fixed order, best c-index first."""
    lines = [
        f"# {cohort}: cross-validated survival models",
        "",
        "| " + " | ".join(SUMMARY_HEADER) + " |",
        "|" + "---|" * len(SUMMARY_HEADER),
    ]
    lines += ["| " + " | ".join(summary_cells(r)) + " |" for _, r in summary.iterrows()]
    lines += ["", SUMMARY_NOTE]
    return "\n".join(lines) + "\n"


# Compact, so that the table fits the report's content pane (about 700 px wide beside a result's caption).
HTML_STYLE = """
body { font: 13px/1.35 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #222;
       margin: 12px; }
h1 { font-size: 17px; margin: 0 0 10px; }
table { border-collapse: collapse; }
th, td { padding: 4px 7px; border-bottom: 1px solid #ddd; white-space: nowrap; }
th { text-align: left; vertical-align: bottom; background: #f3f4f6; border-bottom: 2px solid #bbb; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.first td { border-top: 2px solid #bbb; }
p.note { color: #555; max-width: 60em; }
"""


def to_html(summary: pd.DataFrame, cohort: str) -> str:
    """The Markdown table's content as a self-contained HTML page (no scripts, no external files)."""
    numeric = [False, False] + [True] * (len(SUMMARY_HEADER) - 2)
    rows = []
    previous = None
    for _, r in summary.iterrows():
        # A rule above the first row of each setting, so the settings read as groups.
        first = ' class="first"' if previous is not None and r["setting"] != previous else ""
        previous = r["setting"]
        tds = "".join(
            f'<td class="num">{html.escape(v)}</td>' if num else f"<td>{html.escape(v)}</td>"
            for v, num in zip(summary_cells(r), numeric, strict=True)
        )
        rows.append(f"<tr{first}>{tds}</tr>")
    title = f"{cohort}: cross-validated survival models"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            '<head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{HTML_STYLE}</style></head>",
            "<body>",
            f"<h1>{html.escape(title)}</h1>",
            "<table>",
            "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in SUMMARY_HEADER) + "</tr></thead>",
            "<tbody>",
            *rows,
            "</tbody></table>",
            f'<p class="note">{html.escape(SUMMARY_NOTE)}</p>',
            "</body></html>",
            "",
        ]
    )


def cli(argv: list[str] | None = None) -> int:
    """``healnet evaluate``: write summary.csv, summary.md and summary.html for one cohort."""
    parser = argparse.ArgumentParser(prog="healnet evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohort", required=True)
    parser.add_argument("--results-dir", required=True, type=Path, help="results/{cohort}")
    parser.add_argument("--models", default=None, help="comma-separated models (default: every trained one)")
    parser.add_argument(
        "-o", "--output", required=True, type=Path, help="summary.csv; summary.md and .html go beside it"
    )
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m] if args.models else None
    summary = summarise(read_folds(args.results_dir, models))
    with atomic_output(args.output) as tmp:
        summary.to_csv(tmp, index=False)
    with atomic_output(args.output.with_suffix(".md")) as tmp:
        tmp.write_text(to_markdown(summary, args.cohort))
    with atomic_output(args.output.with_suffix(".html")) as tmp:
        tmp.write_text(to_html(summary, args.cohort), encoding="utf-8")
    print(to_markdown(summary, args.cohort))
    return 0
