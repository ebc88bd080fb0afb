"""``healnet evaluate`` (healnet.evaluation.summary): the summary of every model's folds as CSV,
Markdown and HTML, fusion against each unimodal model fold by fold, means over fewer folds, and a
missing or damaged results table as a one-line error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from factory import as_runs, shared_run
from helpers import assert_one_line_error, run_healnet

from healnet.evaluation import summary as evaluate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def healnet_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HEALNet and the SNN trained on the training tests' cohort, in the workflow's layout
    (``results/planted/healnet``, ``results/none/snn``)."""
    shared_run(tmp_path_factory, "snn")
    out = shared_run(tmp_path_factory, "healnet")
    return as_runs(out, tmp_path_factory.mktemp("runs"), ["healnet", "snn"])


def test_evaluate_summarises_every_model(healnet_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = healnet_run / "results" / "summary.csv"
    assert evaluate.cli(["--cohort", "TINY", "--results-dir", str(healnet_run / "results"),
                         "--runs", "planted/healnet,none/snn", "-o", str(out)]) == 0
    summary = pd.read_csv(out)
    assert list(summary[["model", "setting"]].itertuples(index=False, name=None))[:2] in (
        [("healnet", "full"), ("snn", "full")],
        [("snn", "full"), ("healnet", "full")],
    )
    assert len(summary) == 5 and (summary["n_folds"] == 3).all()
    assert set(summary["encoder"]) == {"planted", "none"}
    folds = pd.read_csv(healnet_run / "results" / "none" / "snn" / "folds.csv").query("metric == 'c_index'")
    row = summary.set_index(["model", "setting"]).loc[("snn", "full")]
    assert row["c_index_mean"] == pytest.approx(folds["value"].mean())
    assert row["c_index_folds"] == ";".join(f"{v:.4f}" for v in folds.sort_values("fold")["value"])
    md = out.with_suffix(".md").read_text()
    assert "| healnet | planted | full |" in md and "| snn | none | full |" in md and "±" in md
    # HEALNet against the SNN fold by fold: mean and spread of the per-fold differences, folds won.
    healnet_c = pd.read_csv(healnet_run / "results" / "planted" / "healnet" / "folds.csv").query(
        "metric == 'c_index' and setting == 'full'"
    )
    diff = healnet_c.set_index("fold")["value"] - folds.query("setting == 'full'").set_index("fold")["value"]
    spread = f"{diff.mean():+.3f} ± {diff.std(ddof=0):.3f}"
    tied = f" ({(diff == 0).sum()} tied)" if (diff == 0).any() else ""
    assert f"| healnet | planted | snn, best unimodal | {spread} | {(diff > 0).sum()} of 3{tied} |" in md
    # The same tables as a self-contained HTML page (the Snakemake report shows it in the page).
    page = out.with_suffix(".html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page
    assert page.count("<tr") == len(summary) + 1 + 2
    assert "<td>healnet</td><td>planted</td><td>full</td>" in page
    assert "<td>healnet</td><td>planted</td><td>snn, best unimodal</td>" in page
    snn = summary.set_index(["model", "setting"]).loc[("snn", "full")]
    assert f"{snn['c_index_mean']:.3f} ± {snn['c_index_std']:.3f}" in page
    ran = run_healnet(capsys, "evaluate", "--cohort", "TINY", "--results-dir", healnet_run / "results",
                      "--runs", "planted/healnet,planted/perceiver", "-o", out)
    assert_one_line_error(ran, "perceiver", command="evaluate", status=1)  # perceiver never trained
    assert pd.read_csv(out).equals(summary)  # the old summary is left untouched


def test_a_folds_table_that_holds_a_word_is_a_one_line_error(
    healnet_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # healnet evaluate reads a (joined) folds.csv as healnet collect reads a fold's
    table = tmp_path / "results" / "planted" / "healnet" / "folds.csv"
    table.parent.mkdir(parents=True)
    broken = pd.read_csv(healnet_run / "results/planted/healnet/folds.csv").astype({"value": object})
    broken.loc[0, "value"] = "x"
    table.write_text(broken.to_csv(index=False))
    ran = run_healnet(capsys, "evaluate", "--cohort", "C", "--results-dir", tmp_path / "results",
                      "--runs", "planted/healnet", "-o", tmp_path / "summary.csv")
    assert_one_line_error(ran, "column 'value' holds 'x'", command="evaluate", status=1, source=table)


def test_paired_differences_compare_fusion_with_each_unimodal_model_fold_by_fold() -> None:
    values = {  # c-index per fold; fold 2 of abmil undefined (no comparable pair)
        "healnet": [0.70, 0.60, 0.80],
        "abmil": [0.65, 0.70, float("nan")],
        "snn": [0.50, 0.60, 0.60],  # fold 1: the same c-index as healnet, a tie
        "my_model": [0.9, 0.9, 0.9],  # not a harness model: skipped
    }
    rows = [
        {"model": m, "encoder": "none" if m == "snn" else "uni", "fold": f, "setting": s, "metric": "c_index",
         "value": v - (s != "full") * 0.2}
        for m, vs in values.items()
        for f, v in enumerate(vs)
        for s in ("full", "omics_only")
    ]
    paired = evaluate.paired_differences(pd.DataFrame(rows)).set_index("baseline")
    assert set(paired["encoder"]) == {"uni"} and list(paired["baseline_encoder"]) == ["uni", "none"]
    assert list(paired["model"]) == ["healnet", "healnet"] and paired.index[0] == "abmil"
    assert paired.loc["abmil", "best_baseline"] and not paired.loc["snn", "best_baseline"]  # 0.675 > 0.55
    assert paired.loc["abmil", "n_folds"] == 2 and paired.loc["abmil", "wins"] == 1
    assert paired.loc["abmil", "mean_difference"] == pytest.approx(((0.70 - 0.65) + (0.60 - 0.70)) / 2)
    assert paired.loc["snn", "mean_difference"] == pytest.approx(0.4 / 3)
    assert paired.loc["snn", "std_difference"] == pytest.approx(np.std([0.20, 0.0, 0.20]))
    assert (paired.loc["snn", "wins"], paired.loc["snn", "ties"], paired.loc["abmil", "ties"]) == (2, 1, 0)
    cells = {row["baseline"]: evaluate.paired_cells(row)[-1] for _, row in paired.reset_index().iterrows()}
    assert cells == {"snn": "2 of 3 (1 tied)", "abmil": "1 of 2"}
    assert evaluate.paired_differences(pd.DataFrame(rows).query("model == 'snn'")).empty


def test_each_encoder_s_fusion_is_compared_with_the_slide_model_on_the_same_features() -> None:
    """With two encoders, HEALNet on UNI features is paired with ABMIL on UNI features (and the SNN,
    which reads no slides), never with ABMIL on the other encoder's; the summary has one row per
    model x encoder x setting."""
    values = {("healnet", "uni"): 0.70, ("abmil", "uni"): 0.60, ("healnet", "virchow2"): 0.65,
              ("abmil", "virchow2"): 0.68, ("snn", "none"): 0.55}
    rows = [{"model": m, "encoder": e, "fold": f, "setting": "full", "metric": "c_index",
             "value": v + f / 100} for (m, e), v in values.items() for f in range(3)]
    paired = evaluate.paired_differences(pd.DataFrame(rows))
    got = {(r.encoder, r.baseline, r.baseline_encoder): round(r.mean_difference, 6)
           for r in paired.itertuples()}
    assert got == {("uni", "abmil", "uni"): 0.10, ("uni", "snn", "none"): 0.15,
                   ("virchow2", "abmil", "virchow2"): -0.03, ("virchow2", "snn", "none"): 0.10}
    summary = evaluate.summarise(pd.DataFrame(rows))
    assert len(summary) == 5 and list(summary.columns[:3]) == ["model", "encoder", "setting"]
    markdown = evaluate.to_markdown(summary, "C", paired)
    assert "| healnet | virchow2 | abmil (virchow2), best unimodal |" in markdown


def test_a_mean_over_fewer_folds_says_so() -> None:
    """A fold without a comparable pair has no c-index; the table must not present the mean of the
    other folds as if it covered them all."""
    rows = [{"model": "snn", "encoder": "none", "fold": f, "setting": "full", "metric": m, "value": v}
            for f, v in enumerate([0.6, float("nan"), 0.8]) for m in ("c_index", "ibs")]
    row = evaluate.summarise(pd.DataFrame(rows)).iloc[0]
    assert (row["c_index_n"], row["n_folds"]) == (2, 3) and row["c_index_mean"] == pytest.approx(0.7)
    cells = evaluate.summary_cells(row)
    assert cells[3] == "0.700 ± 0.100 (2 of 3 folds)" and cells[4] == "n/a"

