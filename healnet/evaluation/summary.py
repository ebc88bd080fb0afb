"""Per-cohort summary of every trained model: ``healnet evaluate``.

Reads ``RESULTS_DIR/{encoder}/{model}/folds.csv`` and writes one row per model x encoder x setting
(the encoder whose features the model read; ``none`` for models that read no slides) with the mean, standard
deviation (population, ddof = 0, over folds, NaN folds left out) and per-fold values of each metric,
as CSV, as a Markdown table (mean ± std) and as a small self-contained HTML page with the same table
(the Snakemake report shows HTML in the page; a CSV is only offered as a download), all written
atomically. The Markdown and HTML also give each multimodal model's fold-paired c-index difference
from each unimodal model on the same encoder's features, the comparison that says whether fusion helped.
"""

from __future__ import annotations

import argparse
import html
from pathlib import Path

import numpy as np
import pandas as pd

from healnet.data.results import NO_ENCODER, read_folds, run_name, search_choices
from healnet.evaluation.metrics import METRICS
from healnet.modalities import MODEL_MODALITIES, MULTIMODAL
from preprocessing.core.atomic import atomic_output

SETTING_ORDER = ("full", "omics_only", "wsi_only", "random_half")


def summarise(folds: pd.DataFrame) -> pd.DataFrame:
    """One row per model x encoder x setting: ``{metric}_mean``, ``{metric}_std``, ``{metric}_n`` (folds
    where the metric is defined), ``c_index_folds``, ``n_folds``."""
    rows = []
    for (model, encoder, setting), group in folds.groupby(["model", "encoder", "setting"], sort=False):
        row: dict[str, object] = {"model": model, "encoder": encoder, "setting": setting}
        for metric in METRICS:
            values = group.loc[group["metric"] == metric].sort_values("fold")["value"].astype(float)
            finite = values[np.isfinite(values)]
            row[f"{metric}_mean"] = float(finite.mean()) if len(finite) else float("nan")
            row[f"{metric}_std"] = float(finite.std(ddof=0)) if len(finite) else float("nan")
            row[f"{metric}_n"] = len(finite)
            if metric == "c_index":
                row["c_index_folds"] = ";".join(f"{v:.4f}" for v in values)
        row["n_folds"] = int(group["fold"].nunique())
        rows.append(row)
    table = pd.DataFrame(rows)
    order = {s: i for i, s in enumerate(SETTING_ORDER)}
    table["_setting"] = table["setting"].map(lambda s: order.get(s, len(order)))
    table = table.sort_values(["_setting", "c_index_mean", "model", "encoder"],
                              ascending=[True, False, True, True])
    columns = [
        "model",
        "encoder",
        "setting",
        "c_index_mean",
        "c_index_std",
        "c_index_folds",
        *(f"{m}_{part}" for m in METRICS[1:] for part in ("mean", "std")),
        *(f"{m}_n" for m in METRICS),
        "n_folds",
    ]
    return table[columns].reset_index(drop=True)


PAIRED_COLUMNS = (
    "model", "encoder", "baseline", "baseline_encoder", "best_baseline", "mean_difference", "std_difference",
    "wins", "ties", "n_folds",
)


TIE = 1e-12  # per-fold c-index differences this small are ties (the same pairs ranked alike)


def paired_differences(folds: pd.DataFrame) -> pd.DataFrame:
    """Each multimodal model's c-index minus each unimodal model's, fold by fold (full setting), on each
    encoder's features: a model on one encoder against the slide models on the same encoder and the
    models that read no slides.

    Both models of a pair are scored on the same held-out patients in a fold, so the per-fold
    difference cancels how hard that fold happens to be; its mean, spread and the count of folds
    won (and tied: on a few held-out patients two models often rank every pair alike) say more about
    a gap than two separate means ± std. ``best_baseline`` marks the unimodal
    model with the highest mean c-index (the comparison a fusion model has to win). Folds where
    either c-index is undefined are left out. Models the harness does not know are skipped.
    """
    c = folds[(folds["metric"] == "c_index") & (folds["setting"] == "full")]
    encoders = sorted(set(c["encoder"]) - {NO_ENCODER}) or [NO_ENCODER]
    frames = [_paired_on(c[c["encoder"].isin({encoder, NO_ENCODER})]) for encoder in encoders]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(PAIRED_COLUMNS))


def _paired_on(c: pd.DataFrame) -> pd.DataFrame:
    """:func:`paired_differences` for the c-indices of one encoder's runs (each model once)."""
    wide = c.pivot_table(index="fold", columns="model", values="value", aggfunc="first")
    encoder_of = dict(zip(c["model"], c["encoder"], strict=False))
    multi = [m for m in wide.columns if m in MULTIMODAL]
    single = [m for m in wide.columns if m in MODEL_MODALITIES and m not in MULTIMODAL]
    if not multi or not single:
        return pd.DataFrame(columns=list(PAIRED_COLUMNS))
    means = {b: wide[b].mean() for b in single}
    best = max(single, key=lambda b: (np.nan_to_num(means[b], nan=-np.inf), b))
    rows = []
    for model in sorted(multi, key=lambda m: -np.nan_to_num(wide[m].mean(), nan=-np.inf)):
        for baseline in sorted(single, key=lambda b: b != best):
            diff = (wide[model] - wide[baseline]).dropna()
            rows.append(
                {
                    "model": model,
                    "encoder": encoder_of[model],
                    "baseline": baseline,
                    "baseline_encoder": encoder_of[baseline],
                    "best_baseline": baseline == best,
                    "mean_difference": float(diff.mean()) if len(diff) else float("nan"),
                    "std_difference": float(diff.std(ddof=0)) if len(diff) else float("nan"),
                    "wins": int((diff > TIE).sum()),
                    "ties": int((diff.abs() <= TIE).sum()),
                    "n_folds": len(diff),
                }
            )
    return pd.DataFrame(rows, columns=list(PAIRED_COLUMNS))


PAIRED_HEADER = ("model", "encoder", "against", "c-index difference", "folds won")
PAIRED_TITLE = "Fold-paired c-index differences (full setting)"
PAIRED_NOTE = (
    "Model minus baseline on the same held-out patients in each fold: mean ± standard deviation over "
    "folds (ddof = 0). A mean well inside its standard deviation is within fold-to-fold noise."
)


def paired_cells(row: pd.Series) -> list[str]:
    """One paired-difference row as texts: model, encoder, baseline (its encoder when it reads slides;
    marked when best), mean ± std, wins."""
    against = str(row["baseline"])
    if row["baseline_encoder"] != NO_ENCODER:
        against += f" ({row['baseline_encoder']})"
    if row["best_baseline"]:
        against += ", best unimodal"
    if np.isfinite(row["mean_difference"]):
        diff = f"{row['mean_difference']:+.3f} ± {row['std_difference']:.3f}"
    else:
        diff = "n/a"
    won = f"{row['wins']} of {row['n_folds']}" + (f" ({row['ties']} tied)" if row["ties"] else "")
    return [str(row["model"]), str(row["encoder"]), against, diff, won]


SUMMARY_HEADER = ("model", "encoder", "setting", "c-index", "IPCW c-index", "integrated Brier", "td AUC",
                  "Kaplan-Meier Brier", "folds")
SUMMARY_NOTE = (
    "Mean ± standard deviation over folds (ddof = 0; folds where a metric is undefined are left out). "
    "Lower is better for the integrated Brier score, higher for the others. Kaplan-Meier Brier is the "
    "integrated Brier score of the training patients' Kaplan-Meier curve on the same held-out patients "
    "and times, a yardstick that ignores every input: a model above it predicts survival worse than that."
)


def fewer_folds(defined: int, folds: int) -> str:
    """" (k of n folds)" when a metric is undefined in some folds, so a mean over fewer is visible."""
    return f" ({defined} of {folds} folds)" if defined < folds else ""


def summary_cells(row: pd.Series) -> list[str]:
    """One summary row as the table's texts: model, encoder, setting, mean ± std per metric, folds."""
    metrics = [
        "n/a" if not np.isfinite(row[f"{m}_mean"])
        else f"{row[f'{m}_mean']:.3f} ± {row[f'{m}_std']:.3f}" + fewer_folds(row[f"{m}_n"], row["n_folds"])
        for m in METRICS
    ]
    return [str(row["model"]), str(row["encoder"]), str(row["setting"]), *metrics, str(row["n_folds"])]


def _markdown_table(header: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(cells) + " |" for cells in rows
    ]


SEARCH_TITLE = "Settings chosen by nested cross-validation (training.search)"
SEARCH_HEADER = ("model", "encoder", "fold", "chosen", "mean inner c-index")
SEARCH_NOTE = ("Chosen on each outer fold's training patients only, by the mean c-index over inner folds; "
               "the held-out patients of that fold were not read.")


def search_cells(row: pd.Series) -> list[str]:
    """One chosen-settings row as texts."""
    inner = f"{row['inner_c_index']:.3f}" if np.isfinite(row["inner_c_index"]) else "n/a"
    return [str(row["model"]), str(row["encoder"]), str(row["fold"]), str(row["chosen"]), inner]


def to_markdown(summary: pd.DataFrame, cohort: str, paired: pd.DataFrame | None = None,
                searched: pd.DataFrame | None = None) -> str:
    """A Markdown table, mean ± std per metric, settings in a fixed order, best c-index first; then
    the fold-paired differences when there are any."""
    lines = [f"# {cohort}: cross-validated survival models", ""]
    lines += _markdown_table(SUMMARY_HEADER, [summary_cells(r) for _, r in summary.iterrows()])
    lines += ["", SUMMARY_NOTE]
    if paired is not None and len(paired):
        lines += ["", f"## {PAIRED_TITLE}", ""]
        lines += _markdown_table(PAIRED_HEADER, [paired_cells(r) for _, r in paired.iterrows()])
        lines += ["", PAIRED_NOTE]
    if searched is not None and len(searched):
        lines += ["", f"## {SEARCH_TITLE}", ""]
        lines += _markdown_table(SEARCH_HEADER, [search_cells(r) for _, r in searched.iterrows()])
        lines += ["", SEARCH_NOTE]
    return "\n".join(lines) + "\n"


# Compact, so that the table fits the report's content pane (about 700 px wide beside a result's caption).
HTML_STYLE = """
body { font: 13px/1.35 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #222;
       margin: 12px; }
h1 { font-size: 17px; margin: 0 0 10px; }
h2 { font-size: 15px; margin: 18px 0 8px; }
table { border-collapse: collapse; }
th, td { padding: 4px 7px; border-bottom: 1px solid #ddd; white-space: nowrap; }
th { text-align: left; vertical-align: bottom; background: #f3f4f6; border-bottom: 2px solid #bbb; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.first td { border-top: 2px solid #bbb; }
p.note { color: #555; max-width: 60em; }
"""


def _tds(cells: list[str], numeric: list[bool]) -> str:
    """Table cells of one row; numbers right-aligned."""
    return "".join(
        f'<td class="num">{html.escape(v)}</td>' if num else f"<td>{html.escape(v)}</td>"
        for v, num in zip(cells, numeric, strict=True)
    )


def _html_table(header: tuple[str, ...], rows: list[str], note: str) -> list[str]:
    """A table (``rows`` are ready ``<tr>`` elements) and the note under it."""
    return [
        "<table>",
        "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead>",
        "<tbody>",
        *rows,
        "</tbody></table>",
        f'<p class="note">{html.escape(note)}</p>',
    ]


def to_html(summary: pd.DataFrame, cohort: str, paired: pd.DataFrame | None = None,
            searched: pd.DataFrame | None = None) -> str:
    """The Markdown content as a self-contained HTML page (no scripts, no external files)."""
    numeric = [False, False, False] + [True] * (len(SUMMARY_HEADER) - 3)
    rows = []
    previous = None
    for _, r in summary.iterrows():
        # A rule above the first row of each setting, so the settings read as groups.
        first = ' class="first"' if previous is not None and r["setting"] != previous else ""
        previous = r["setting"]
        rows.append(f"<tr{first}>{_tds(summary_cells(r), numeric)}</tr>")
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
            *_html_table(SUMMARY_HEADER, rows, SUMMARY_NOTE),
            *_paired_html(paired),
            *_search_html(searched),
            "</body></html>",
            "",
        ]
    )


def _paired_html(paired: pd.DataFrame | None) -> list[str]:
    if paired is None or not len(paired):
        return []
    numeric = [False, False, False, True, True]
    rows = [f"<tr>{_tds(paired_cells(r), numeric)}</tr>" for _, r in paired.iterrows()]
    return [f"<h2>{html.escape(PAIRED_TITLE)}</h2>", *_html_table(PAIRED_HEADER, rows, PAIRED_NOTE)]


def _search_html(searched: pd.DataFrame | None) -> list[str]:
    if searched is None or not len(searched):
        return []
    numeric = [False, False, True, False, True]
    rows = [f"<tr>{_tds(search_cells(r), numeric)}</tr>" for _, r in searched.iterrows()]
    return [f"<h2>{html.escape(SEARCH_TITLE)}</h2>", *_html_table(SEARCH_HEADER, rows, SEARCH_NOTE)]


def cli(argv: list[str] | None = None) -> int:
    """``healnet evaluate``: write summary.csv, summary.md and summary.html for one cohort."""
    parser = argparse.ArgumentParser(prog="healnet evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohort", required=True)
    parser.add_argument("--results-dir", required=True, type=Path, help="results/{cohort}")
    parser.add_argument("--runs", default=None,
                        help="comma-separated {encoder}/{model} folders (default: every trained one)")
    parser.add_argument(
        "-o", "--output", required=True, type=Path, help="summary.csv; summary.md and .html go beside it"
    )
    args = parser.parse_args(argv)
    runs = [r for r in args.runs.split(",") if r] if args.runs else None
    folds = read_folds(args.results_dir, runs)
    summary, paired = summarise(folds), paired_differences(folds)
    read = folds[["encoder", "model"]].drop_duplicates().itertuples(index=False)
    searched = search_choices(args.results_dir, [run_name(encoder, model) for encoder, model in read])
    with atomic_output(args.output) as tmp:
        summary.to_csv(tmp, index=False)
    with atomic_output(args.output.with_suffix(".md")) as tmp:
        tmp.write_text(to_markdown(summary, args.cohort, paired, searched))
    with atomic_output(args.output.with_suffix(".html")) as tmp:
        tmp.write_text(to_html(summary, args.cohort, paired, searched), encoding="utf-8")
    print(to_markdown(summary, args.cohort, paired, searched))
    return 0
