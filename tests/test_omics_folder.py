"""`healnet omics` on the demo layout (separate Xena-style tables + MAF + slides folder) and bad inputs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import assert_one_line_error, raises_one_line_error, run_healnet

from preprocessing.core.errors import InputError
from preprocessing.omics.barcodes import choose_samples
from preprocessing.omics.cli import cli
from preprocessing.omics.join import list_slide_files
from preprocessing.omics.readers import read_omics
from preprocessing.tiling.tiles import write_tiles

GENES = ["TP53", "EGFR", "KRAS", "STK11", "KEAP1", "MKI67"]
UUID = "0a1b2c3d-1111-2222-3333-444455556666"


def pid(i: int) -> str:
    return f"TCGA-AB-{i:04d}"


def slide_name(i: int, dx: int = 1) -> str:
    return f"{pid(i)}-01Z-00-DX{dx}.{UUID}.svs"


def write_demo_tables(root: Path, n_filler: int = 14) -> dict:
    """A small cohort in the demo layout with every special case the join must handle.

    1: rna 01A and 01B (01A must win), MAF has a KRAS missense + TP53 silent on 01A, EGFR on 01B.
    2: rna 01A plus a -11A normal (ignored), not in the MAF, two slides.
    3: rna only (no cnv), only a silent variant in the MAF -> mutation data, all zero.
    4: no omics, one slide.      5: no omics, no slide (kept, flagged).
    6: no survival time (dropped).    7: omics but no clinical row.    8: only a normal rna sample.
    10..: filler patients with everything.    99: a slide without clinical data.
    """
    rng = np.random.default_rng(0)
    omics, slides = root / "omics", root / "slides"
    omics.mkdir(parents=True)
    slides.mkdir()
    filler = list(range(10, 10 + n_filler))
    clinical_ids = [1, 2, 3, 4, 5, 6, 8, *filler]
    rows = []
    for i in clinical_ids:
        rows.append({"sample": f"{pid(i)}-01", "_PATIENT": pid(i), "OS": int(i % 3 == 0),
                     "OS.time": float("nan") if i == 6 else 30.0 * i + 5,
                     "age_at_initial_pathologic_diagnosis": 40 + i, "gender": "FEMALE" if i % 2 else "MALE"})
    rows.append({**rows[1], "sample": f"{pid(2)}-11"})  # a normal sample row repeats patient 2's survival
    pd.DataFrame(rows).to_csv(omics / "clinical.tsv", sep="\t", index=False)

    rna_samples = {f"{pid(1)}-01A": 10.0, f"{pid(1)}-01B": 99999.0, f"{pid(2)}-01A": 20.0,
                   f"{pid(2)}-11A": 77777.0, f"{pid(3)}-01A": 30.0, f"{pid(7)}-01A": 70.0,
                   f"{pid(8)}-11A": 88888.0}
    rna_samples.update({f"{pid(i)}-01A": float(i) for i in filler})
    rna = pd.DataFrame({"gene": GENES})
    for sample, base in rna_samples.items():
        rna[sample] = np.round(base * (1 + np.arange(len(GENES))) + rng.gamma(2.0, 300.0, len(GENES)), 2)
    rna.to_csv(omics / "rna.tsv", sep="\t", index=False)

    cnv = pd.DataFrame({"gene": GENES})
    for i in [1, 2, *filler]:
        cnv[f"{pid(i)}-01A"] = rng.integers(-2, 3, len(GENES))
    cnv.to_csv(omics / "cnv.tsv", sep="\t", index=False)

    maf = [("KRAS", f"{pid(1)}-01A-11D-A10Y-09", "Missense_Mutation"),
           ("TP53", f"{pid(1)}-01A-11D-A10Y-09", "Silent"),
           ("EGFR", f"{pid(1)}-01B-11D-A10Y-09", "Missense_Mutation"),
           ("STK11", f"{pid(3)}-01A-11D-A10Y-09", "Silent")]
    maf += [("TP53", f"{pid(i)}-01A-11D-A10Y-09", "Nonsense_Mutation") for i in filler[:4]]
    maf += [("KEAP1", f"{pid(i)}-01A-11D-A10Y-09", "3'UTR") for i in filler]
    pd.DataFrame(maf, columns=["Hugo_Symbol", "Tumor_Sample_Barcode", "Variant_Classification"]).to_csv(
        omics / "mutations.maf", sep="\t", index=False)

    names = [slide_name(1), slide_name(2), slide_name(2, 2), slide_name(4), slide_name(99)]
    names += [slide_name(i) for i in filler]
    for name in names:
        (slides / name).write_bytes(b"")
    return {"omics": omics, "slides": slides, "filler": filler, "rna": rna}


@pytest.fixture()
def demo(tmp_path: Path) -> dict:
    return write_demo_tables(tmp_path / "DEMO")


def run(demo: dict, out: Path, *extra: str) -> dict:
    argv = ["--cohort", "DEMO", "--omics", str(demo["omics"]), "--slides", str(demo["slides"]),
            "--n-folds", "3", "-o", str(out), *extra]
    assert cli(argv) == 0
    return {
        "manifest": pd.read_parquet(out / "manifest.parquet").set_index("patient"),
        "features": pd.read_parquet(out / "features.parquet"),
        "splits": pd.read_parquet(out / "splits.parquet"),
        "summary": json.loads((out / "summary.json").read_text()),
    }


def test_separate_tables_join_per_patient(
    demo: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        res = run(demo, tmp_path / "out")
    m, f, summary = res["manifest"], res["features"], res["summary"]
    expected = sorted(pid(i) for i in [1, 2, 3, 4, 5, 8, *demo["filler"]])
    assert list(m.index) == expected  # 6 (no survival) and 7 (no clinical) are not patients
    assert summary["patients_dropped_no_survival"] == [pid(6)]
    assert summary["omic_patients_without_survival"]["rna"] == 1
    assert summary["slides"]["slides_without_clinical"] == [slide_name(99)[:-4]]
    # slides matched on the first 12 characters, stems without extension
    assert list(m.at[pid(2), "slides"]) == [slide_name(2)[:-4], slide_name(2, 2)[:-4]]
    assert m.loc[[pid(1), pid(2), pid(4)], "has_wsi"].all() and not m.loc[[pid(3), pid(5)], "has_wsi"].any()
    # missing modalities are marked, not dropped
    assert m.loc[pid(3), ["has_rna", "has_cnv", "has_mut"]].tolist() == [True, False, True]
    assert m.loc[pid(2), ["has_rna", "has_cnv", "has_mut"]].tolist() == [True, True, False]
    assert not m.at[pid(4), "has_omics"] and m.at[pid(4), "has_data"]
    assert not m.at[pid(5), "has_data"] and summary["patients_without_any_modality"] == [pid(5), pid(8)]
    assert f.loc[pid(3), [c for c in f.columns if c.startswith("cnv:")]].isna().all()
    assert set(f.index) == set(m.index[m["has_omics"]])
    # months from days
    assert m.at[pid(1), "time"] == pytest.approx(35 / 30.4375)
    assert m["event"].dtype == np.int64 and m.at[pid(3), "event"] == 1
    assert "DEMO: 3 of 20 patients have no rna" in caplog.text
    assert "DEMO: 4 of 20 patients have no cnv" in caplog.text
    assert "DEMO: 4 of 20 patients have no mut" in caplog.text


def test_barcode_rules_duplicates_and_normals(demo: dict, tmp_path: Path) -> None:
    res = run(demo, tmp_path / "out")
    f, m = res["features"], res["manifest"]
    rna = demo["rna"].set_index("gene")
    assert f.at[pid(1), "rna:TP53"] == pytest.approx(rna.at["TP53", f"{pid(1)}-01A"])  # 01A over 01B
    assert f.at[pid(2), "rna:EGFR"] == pytest.approx(rna.at["EGFR", f"{pid(2)}-01A"])  # tumour, not -11A
    assert not m.at[pid(8), "has_rna"] and pid(8) not in f.index  # a normal sample alone is no tumour data
    choice = choose_samples(["TCGA-AB-0001-11A", "TCGA-AB-0001-06A", "TCGA-AB-0001-01B-02R",
                             "TCGA-AB-0001-01B-01R", "TCGA-AB-0002-02A"], "t")
    assert choice.chosen == {"TCGA-AB-0001": "TCGA-AB-0001-01B-01R", "TCGA-AB-0002": "TCGA-AB-0002-02A"}
    assert choice.normals_ignored == ["TCGA-AB-0001-11A"]


def test_maf_silent_variants_excluded(demo: dict, tmp_path: Path) -> None:
    f = run(demo, tmp_path / "out")["features"]
    mut = [c for c in f.columns if c.startswith("mut:")]
    assert set(mut) == {"mut:KRAS", "mut:TP53"}  # KEAP1 only 3'UTR, STK11 only silent, EGFR only on 01B
    assert f.at[pid(1), "mut:KRAS"] == 1 and f.at[pid(1), "mut:TP53"] == 0
    assert f.loc[pid(3), mut].tolist() == [0, 0]
    assert f.loc[pid(2), mut].isna().all()  # not in the MAF: no mutation data
    keep = run(demo, tmp_path / "out2", "--include-silent-mutations")["features"]
    assert keep.at[pid(3), "mut:STK11"] == 1 and "mut:KEAP1" in keep.columns


def test_tiles_dir_marks_unusable_slides(demo: dict, tmp_path: Path) -> None:
    tiles = tmp_path / "tiles"
    ok = pd.DataFrame({"x": [0, 256], "y": [0, 0], "tissue_fraction": [0.9, 0.8]})
    for i in [4, *demo["filler"]]:
        write_tiles(tiles / f"{slide_name(i)[:-4]}.parquet", ok, {"slide": i})
    write_tiles(tiles / f"{slide_name(1)[:-4]}.parquet", ok.iloc[:0], {"slide": 1})
    write_tiles(tiles / f"{slide_name(2)[:-4]}.parquet", ok.iloc[:0], {"failed": "OpenSlideError: bad tile"})
    write_tiles(tiles / f"{slide_name(2, 2)[:-4]}.parquet", ok, {"slide": 2})
    res = run(demo, tmp_path / "out", "--tiles-dir", str(tiles))
    m, summary = res["manifest"], res["summary"]
    assert not m.at[pid(1), "has_wsi"] and list(m.at[pid(1), "failed_slides"]) == [
        f"{slide_name(1)[:-4]}: no tissue patches"]
    assert m.at[pid(2), "has_wsi"] and list(m.at[pid(2), "slides"]) == [slide_name(2, 2)[:-4]]
    assert list(m.at[pid(2), "failed_slides"]) == [f"{slide_name(2)[:-4]}: failed: OpenSlideError: bad tile"]
    assert {f["reason"] for f in summary["slides"]["failed_slides"]} == {
        "no tissue patches", "failed: OpenSlideError: bad tile"}
    assert summary["patients_per_modality"]["wsi"] == 1 + 1 + len(demo["filler"])


def test_outputs_contract_and_generated_splits(demo: dict, tmp_path: Path) -> None:
    res = run(demo, tmp_path / "out", "--clinical-covariates", "age,is_female", "--seed", "3")
    m, f, s = res["manifest"], res["features"], res["splits"]
    assert (f.dtypes == np.float32).all() and f.at[pid(1), "clin:is_female"] == 1
    assert f.at[pid(2), "clin:age"] == 42 and f.at[pid(2), "clin:is_female"] == 0
    assert s.dtypes["fold"] == np.int64 and set(s["role"]) == {"train", "val"}
    per_fold = s.groupby("fold")["patient"].agg(["nunique", "size"])
    assert (per_fold["nunique"] == len(m)).all() and (per_fold["size"] == len(m)).all()
    assert s[s["role"] == "val"]["patient"].value_counts().eq(1).all()  # held out exactly once
    folds = res["summary"]["splits"]["folds"]
    assert len(folds) == 3 and all(len(fd["time_bin_cuts_months"]) == 3 for fd in folds)
    again = run(demo, tmp_path / "out2", "--clinical-covariates", "age,is_female", "--seed", "3")["splits"]
    pd.testing.assert_frame_equal(s, again)
    assert not list(tmp_path.glob("out/.*"))  # no temporary files left behind


def test_slide_list_and_split_files(demo: dict, tmp_path: Path) -> None:
    listing = tmp_path / "slides.txt"
    normal = f"{pid(2)}-11A-01-TS1.{UUID}.svs"  # a frozen section of normal tissue
    listing.write_text(f"# slides\n/some/where/{slide_name(1)}\n{slide_name(4)}\n{normal}\n\n")
    patients = sorted(pid(i) for i in [1, 2, 3, 4, 5, 8, *demo["filler"]])
    splits = tmp_path / "splits"
    splits.mkdir()
    for k in range(2):
        val = patients[k::2]
        train = [p for p in patients if p not in val]
        pd.DataFrame({"train": pd.Series(train), "val": pd.Series(val)}).to_csv(splits / f"splits_{k}.csv")
    out = tmp_path / "out"
    assert cli(["--cohort", "D", "--omics", str(demo["omics"]), "--slide-list", str(listing),
                "--splits", str(splits), "-o", str(out)]) == 0
    m = pd.read_parquet(out / "manifest.parquet").set_index("patient")
    assert m["has_wsi"].sum() == 2 and m.at[pid(1), "has_wsi"] and not m.at[pid(2), "has_wsi"]
    why = "not a tumour sample (sample type 11): not used"
    assert list(m.at[pid(2), "failed_slides"]) == [f"{normal[:-4]}: {why}"]
    s = pd.read_parquet(out / "splits.parquet")
    assert set(s.loc[(s["fold"] == 1) & (s["role"] == "val"), "patient"]) == set(patients[1::2])
    listing.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")  # a picture passed by mistake
    with raises_one_line_error(match="slides.txt: slide list is not a text file"):
        cli(["--cohort", "D", "--omics", str(demo["omics"]), "--slide-list", str(listing), "-o", str(out)])


# ------------------------------------------------------------------------------- bad inputs


def mcat_table(path: Path, rows: list[dict] | None = None) -> Path:
    rows = rows or [
        {"case_id": "TCGA-AB-0001", "slide_id": slide_name(1), "survival_months": 10.0, "censorship": 0},
        {"case_id": "TCGA-AB-0001", "slide_id": slide_name(1, 2), "survival_months": 10.0, "censorship": 0},
        {"case_id": "TCGA-AB-0002", "slide_id": slide_name(2), "survival_months": 20.0, "censorship": 1},
    ]
    frame = pd.DataFrame(rows)
    frame.insert(0, "Unnamed: 0", range(len(frame)))
    for gene in ("TP53", "EGFR"):
        frame[f"{gene}_rnaseq"] = 0.5
        frame[f"{gene}_cnv"] = 1
    frame.to_csv(path, index=False)
    return path


def test_mcat_small_table_and_gzip(tmp_path: Path) -> None:
    tables = read_omics(mcat_table(tmp_path / "t.csv.gz"))
    assert list(tables.clinical.index) == ["TCGA-AB-0001", "TCGA-AB-0002"]
    assert tables.clinical["event"].tolist() == [1, 0]
    assert list(tables.omics["rna"].columns) == ["TP53", "EGFR"] and "mut" not in tables.omics
    assert tables.listed_slides["TCGA-AB-0001"] == [slide_name(1)[:-4], slide_name(1, 2)[:-4]]


def test_mcat_table_with_tiles_folder_only(tmp_path: Path) -> None:
    table = mcat_table(tmp_path / "t.csv")
    tiles = tmp_path / "tiles"
    ok = pd.DataFrame({"x": [0], "y": [0], "tissue_fraction": [1.0]})
    write_tiles(tiles / f"{slide_name(1)[:-4]}.parquet", ok, {})
    write_tiles(tiles / f"{slide_name(2)[:-4]}.parquet", ok.iloc[:0], {})
    out = tmp_path / "out"
    assert cli(["--cohort", "M", "--omics", str(table), "--tiles-dir", str(tiles), "--n-folds", "2",
                "-o", str(out)]) == 0
    m = pd.read_parquet(out / "manifest.parquet").set_index("patient")
    assert m["has_wsi"].tolist() == [True, False]
    assert list(m.at["TCGA-AB-0001", "slides"]) == [slide_name(1)[:-4]]
    assert len(m.at["TCGA-AB-0001", "slide_ids_listed"]) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["slides"]["slides_listed_but_absent"] == [slide_name(1, 2)[:-4]]
    with raises_one_line_error(match="tiles folder not found"):
        cli(["--cohort", "M", "--omics", str(table), "--tiles-dir", str(tmp_path / "nope"), "-o", str(out)])


def test_mcat_table_with_imported_feature_stores_only(tmp_path: Path) -> None:
    """Features imported from CLAM or TRIDENT come without tiles: the stores name the slides, and a
    store without patches, one recorded as failed and one that is damaged leave their slide unusable."""
    from factory import write_feature_store

    table = mcat_table(tmp_path / "t.csv")
    stores = tmp_path / "features"
    write_feature_store(stores / f"{slide_name(1)[:-4]}.zarr", np.ones((3, 4)), np.zeros((3, 2)))
    write_feature_store(stores / f"{slide_name(1, 2)[:-4]}.zarr", np.zeros((0, 4)), np.zeros((0, 2)),
                        failed="more than 1.00% of 2 patches cannot be decoded")
    write_feature_store(stores / f"{slide_name(2)[:-4]}.zarr", np.ones((2, 4)), np.zeros((2, 2)))
    (stores / f"{slide_name(2)[:-4]}.zarr" / "zarr.json").write_text("{not json")
    out = tmp_path / "out"
    assert cli(["--cohort", "M", "--omics", str(table), "--features-dir", str(stores), "--n-folds", "2",
                "-o", str(out)]) == 0
    m = pd.read_parquet(out / "manifest.parquet").set_index("patient")
    assert m["has_wsi"].tolist() == [True, False]
    assert list(m.at["TCGA-AB-0001", "slides"]) == [slide_name(1)[:-4]]
    failed = dict(f.split(": ", 1) for f in m.at["TCGA-AB-0001", "failed_slides"])
    assert failed == {slide_name(1, 2)[:-4]: "failed: more than 1.00% of 2 patches cannot be decoded"}
    assert "not a readable feature store" in m.at["TCGA-AB-0002", "failed_slides"][0]


def expect_error(fn, *args, source: str | Path, words: tuple[str, ...]) -> InputError:
    with raises_one_line_error(*words) as info:
        fn(*args)
    assert Path(info.value.source).name == Path(source).name or str(source) in info.value.source
    return info.value


def test_mcat_conflicting_negative_and_missing_survival(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = [{"case_id": "TCGA-AB-0001", "slide_id": slide_name(1), "survival_months": 10.0, "censorship": 0},
            {"case_id": "TCGA-AB-0002", "slide_id": slide_name(2), "survival_months": 20.0, "censorship": 1}]
    conflict = mcat_table(tmp_path / "c.csv", [*base, {**base[0], "survival_months": 12.5}])
    expect_error(read_omics, conflict, source=conflict, words=("conflicting survival", "TCGA-AB-0001"))
    negative = mcat_table(tmp_path / "n.csv", [base[0], {**base[1], "survival_months": -3}])
    expect_error(read_omics, negative, source=negative, words=("negative", "TCGA-AB-0002"))
    text = mcat_table(tmp_path / "x.csv", [base[0], {**base[1], "survival_months": "soon"}])
    expect_error(read_omics, text, source=text, words=("non-numeric", "TCGA-AB-0002"))
    missing = mcat_table(tmp_path / "m.csv", [base[0], {**base[1], "survival_months": None}])
    with caplog.at_level(logging.WARNING):
        tables = read_omics(missing)
    assert tables.dropped_no_survival == ["TCGA-AB-0002"] and "without survival" in caplog.text
    bad_id = mcat_table(tmp_path / "b.csv", [base[0], {**base[1], "case_id": "PATIENT-2"}])
    expect_error(read_omics, bad_id, source=bad_id, words=("not a TCGA barcode", "PATIENT-2", "line 3"))


def test_folder_bad_inputs(demo: dict) -> None:
    omics = demo["omics"]
    rna = pd.read_csv(omics / "rna.tsv", sep="\t").astype({f"{pid(1)}-01A": object})
    rna.loc[2, f"{pid(1)}-01A"] = "high"
    rna.to_csv(omics / "rna.tsv", sep="\t", index=False)
    expect_error(read_omics, omics, source=omics / "rna.tsv", words=("non-numeric", "KRAS", f"{pid(1)}-01A"))

    strangers = demo["rna"].rename(columns=lambda c: c.replace("TCGA-AB", "TCGA-ZZ"))
    strangers.to_csv(omics / "rna.tsv", sep="\t", index=False)
    with raises_one_line_error() as info:
        cli(["--cohort", "D", "--omics", str(omics), "-o", str(omics.parent / "o")])
    assert "rna.tsv" in info.value.source and "no patients in common" in info.value.reason
    demo["rna"].to_csv(omics / "rna.tsv", sep="\t", index=False)

    cnv = pd.read_csv(omics / "cnv.tsv", sep="\t").rename(columns={f"{pid(1)}-01A": "TCGA-AB-1-01A"})
    cnv.to_csv(omics / "cnv.tsv", sep="\t", index=False)
    expect_error(read_omics, omics, source=omics / "cnv.tsv", words=("TCGA-AB-1-01A",))
    (omics / "cnv.tsv").write_text("gene\n")
    expect_error(read_omics, omics, source=omics / "cnv.tsv", words=("empty",))
    (omics / "cnv.tsv").unlink()

    clinical = pd.read_csv(omics / "clinical.tsv", sep="\t")
    clinical.loc[3, "OS.time"] = -1
    clinical.to_csv(omics / "clinical.tsv", sep="\t", index=False)
    expect_error(read_omics, omics, source=omics / "clinical.tsv", words=("negative", pid(4)))
    clinical.loc[3, "OS.time"] = 40
    clinical.loc[len(clinical)] = {**clinical.loc[0].to_dict(), "sample": f"{pid(1)}-06", "OS.time": 999}
    clinical.to_csv(omics / "clinical.tsv", sep="\t", index=False)
    expect_error(read_omics, omics, source=omics / "clinical.tsv", words=("conflicting survival", pid(1)))
    (omics / "clinical.tsv").write_text("")
    expect_error(read_omics, omics, source=omics / "clinical.tsv", words=("empty",))


def test_damaged_downloads_and_infinite_values_are_one_line_errors(demo: dict, tmp_path: Path) -> None:
    """A truncated .gz, an R-style -Inf (log2 of 0) and an infinite survival time are named errors,
    not a traceback or a training mean of -inf."""
    rng = np.random.default_rng(0)
    many = [{"case_id": pid(i), "slide_id": slide_name(i), "survival_months": rng.uniform(1, 99),
             "censorship": int(rng.integers(2))} for i in range(1, 4000)]
    table = mcat_table(tmp_path / "t.csv.gz", many)  # the header decodes, the cut comes later
    data = table.read_bytes()
    table.write_bytes(data[: len(data) // 2])
    expect_error(read_omics, table, source=table, words=("damaged compressed file",))
    base = [{"case_id": "TCGA-AB-0001", "slide_id": slide_name(1), "survival_months": 10.0, "censorship": 0},
            {"case_id": "TCGA-AB-0002", "slide_id": slide_name(2), "survival_months": 20.0, "censorship": 1}]
    forever = mcat_table(tmp_path / "f.csv", [base[0], {**base[1], "survival_months": float("inf")}])
    expect_error(read_omics, forever, source=forever, words=("infinite survival time", "TCGA-AB-0002"))

    omics = demo["omics"]
    rna = pd.read_csv(omics / "rna.tsv", sep="\t")
    rna.loc[1, f"{pid(2)}-01A"] = -np.inf
    rna.to_csv(omics / "rna.tsv", sep="\t", index=False)
    expect_error(read_omics, omics, source=omics / "rna.tsv",
                 words=("infinite", "-inf", "EGFR", f"{pid(2)}-01A"))


def test_a_barcode_column_with_a_typo_names_the_row(demo: dict) -> None:
    """One bad value in the patient column is reported as such, not as a missing patient column."""
    omics = demo["omics"]
    clinical = pd.read_csv(omics / "clinical.tsv", sep="\t")
    clinical.loc[2, "_PATIENT"] = "AB-0003"
    clinical.to_csv(omics / "clinical.tsv", sep="\t", index=False)
    expect_error(read_omics, omics, source=omics / "clinical.tsv", words=("_PATIENT", "AB-0003", "line 4"))


def test_an_empty_preferred_sample_does_not_hide_a_measured_one(demo: dict) -> None:
    """Patient 1's RNA has samples 01A and 01B; with 01A all NA, the measured 01B is the patient's."""
    omics = demo["omics"]
    rna = demo["rna"].copy()
    rna[f"{pid(1)}-01A"] = np.nan
    rna.to_csv(omics / "rna.tsv", sep="\t", index=False)
    tables = read_omics(omics)
    assert tables.omics["rna"].loc[pid(1)].tolist() == rna[f"{pid(1)}-01B"].tolist()


def test_split_file_errors(demo: dict, tmp_path: Path) -> None:
    patients = sorted(pid(i) for i in [1, 2, 3, 4, 5, 8, *demo["filler"]])
    splits = tmp_path / "splits"
    splits.mkdir()

    def write(train: list[str], val: list[str]) -> None:
        for k in range(2):
            table = pd.DataFrame({"train": pd.Series(train), "val": pd.Series(val)})
            table.to_csv(splits / f"splits_{k}.csv")

    argv = ["--cohort", "D", "--omics", str(demo["omics"]), "--splits", str(splits),
            "-o", str(tmp_path / "o")]
    write(patients[3:], [*patients[:3], "TCGA-QQ-0001"])
    expect_error(cli, argv, source=splits / "splits_0.csv", words=("not in the manifest", "TCGA-QQ-0001"))
    write(patients[2:], patients[:3])
    expect_error(cli, argv, source=splits / "splits_0.csv", words=("both train and val", patients[2]))
    write(patients[4:], patients[:3])
    expect_error(cli, argv, source=splits / "splits_0.csv", words=("neither train nor val", patients[3]))
    assert not (tmp_path / "o" / "manifest.parquet").exists()  # nothing written on error
    write(patients[3:], patients[:3])
    (splits / "splits_00.csv").write_text((splits / "splits_0.csv").read_text())
    expect_error(cli, argv, source=splits, words=("two split files for the same fold", "splits_00.csv"))
    (splits / "splits_00.csv").unlink()
    # R's write.csv pads the shorter column with NA
    for k in range(2):
        text = (splits / f"splits_{k}.csv").read_text().replace(",,", ",NA,").replace(",\n", ",NA\n")
        (splits / f"splits_{k}.csv").write_text(text)
    assert "NA" in (splits / "splits_0.csv").read_text()
    assert cli(argv) == 0


def test_command_line_reports_one_line(demo: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (demo["omics"] / "clinical.tsv").write_text("sample\tOS\tOS.time\n")
    ran = run_healnet(capsys, "omics", "--cohort", "D", "--omics", demo["omics"], "-o", tmp_path / "o")
    assert_one_line_error(ran, "clinical.tsv", "empty", command="omics", status=1)


def test_cbioportal_and_gdc_layouts(tmp_path: Path) -> None:
    cbio = tmp_path / "cbio"
    cbio.mkdir()
    (cbio / "case_lists").mkdir()
    (cbio / "meta_clinical_patient.txt").write_text("cancer_study_identifier: x\n")
    (cbio / "data_clinical_patient.txt").write_text(
        "#Patient Identifier\tOverall Survival (Months)\tOverall Survival Status\tDiagnosis Age\tSex\n"
        "#STRING\tNUMBER\tSTRING\tNUMBER\tSTRING\n"
        "PATIENT_ID\tOS_MONTHS\tOS_STATUS\tAGE\tSEX\n"
        "TCGA-AB-0001\t12.5\t1:DECEASED\t60\tFemale\n"
        "TCGA-AB-0002\t30.1\t0:LIVING\t55\tMale\n"
        "TCGA-AB-0003\t[Not Available]\t0:LIVING\t50\tMale\n")
    (cbio / "data_mrna_seq_v2_rsem.txt").write_text(
        "Hugo_Symbol\tEntrez_Gene_Id\tTCGA-AB-0001-01\tTCGA-AB-0002-01\n"
        "TP53\t7157\t812.5\t90.25\nEGFR\t1956\t15.0\tNA\n\t100\t1\t2\n")
    (cbio / "data_cna.txt").write_text("Hugo_Symbol\tEntrez_Gene_Id\tTCGA-AB-0002-01\nTP53\t7157\t-1\n")
    (cbio / "data_mutations.txt").write_text(
        "#version 2.4\nHugo_Symbol\tVariant_Classification\tTumor_Sample_Barcode\n"
        "KRAS\tMissense_Mutation\tTCGA-AB-0001-01\nTP53\tIntron\tTCGA-AB-0002-01\n")
    tables = read_omics(cbio)
    assert tables.clinical["time"].to_dict() == {"TCGA-AB-0001": 12.5, "TCGA-AB-0002": 30.1}
    assert tables.clinical["event"].tolist() == [1, 0] and tables.dropped_no_survival == ["TCGA-AB-0003"]
    assert tables.clinical["is_female"].tolist() == [1.0, 0.0] and tables.clinical["age"].tolist() == [60, 55]
    assert list(tables.omics["rna"].columns) == ["TP53", "EGFR"]  # Entrez IDs and blank symbols dropped
    assert tables.omics["rna"].at["TCGA-AB-0001", "TP53"] == 812.5
    assert list(tables.omics["cnv"].index) == ["TCGA-AB-0002"]
    assert tables.omics["mut"].to_dict() == {"KRAS": {"TCGA-AB-0001": 1.0, "TCGA-AB-0002": 0.0}}

    gdc = tmp_path / "gdc"
    gdc.mkdir()
    (gdc / "clinical.tsv").write_text(
        "case_id\tcase_submitter_id\tvital_status\tdays_to_death\tdays_to_last_follow_up\tage_at_index\tgender\n"
        "3c1b\tTCGA-AB-0001\tDead\t400\t'--\t60\tfemale\n"
        "3c1b\tTCGA-AB-0001\tDead\t400\t'--\t60\tfemale\n"
        "9e2f\tTCGA-AB-0002\tAlive\t'--\t900\t55\tmale\n")
    (gdc / "TCGA-XX.htseq_fpkm.tsv.gz").write_bytes(b"")  # recognised as expression, but unreadable
    with raises_one_line_error(match="htseq_fpkm"):
        read_omics(gdc)
    (gdc / "TCGA-XX.htseq_fpkm.tsv.gz").unlink()
    tables = read_omics(gdc)
    assert tables.clinical["time"].tolist() == pytest.approx([400 / 30.4375, 900 / 30.4375])
    assert tables.clinical["event"].tolist() == [1, 0] and tables.omics == {}


def test_slides_in_gdc_download_folders_join_as_a_flat_folder(demo: dict, tmp_path: Path) -> None:
    flat = run(demo, tmp_path / "flat")["manifest"]
    for k, path in enumerate(sorted(demo["slides"].iterdir())):   # the GDC client's layout
        (demo["slides"] / f"uuid-{k}").mkdir()
        path.rename(demo["slides"] / f"uuid-{k}" / path.name)
    nested = run(demo, tmp_path / "nested")["manifest"]
    pd.testing.assert_frame_equal(nested, flat)

    (demo["slides"] / "again").mkdir()
    (demo["slides"] / "again" / slide_name(4)).write_bytes(b"")
    with raises_one_line_error(match=r"more than once.*" + slide_name(4)[:-4]):
        list_slide_files(demo["slides"])
