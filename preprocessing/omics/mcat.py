"""The MCAT/PORPOISE layout: one table with a row per slide, clinical and omic columns side by side.

One file (``.csv``, ``.csv.zip``, ``.csv.gz``, ``.tsv``): ``case_id``, ``slide_id``,
``survival_months``, ``censorship`` (1 = censored), then gene columns ``{gene}_rnaseq``,
``{gene}_cnv``, ``{gene}_mut``. Every other column (``age``, ``is_female``, ``site``,
``oncotree_code``, stray ``Unnamed: 0`` index columns, train flags) is not an omic feature; ``age``
and ``is_female`` are kept as clinical covariates. Rows of one patient must agree on the omic
values; the slides they name are kept as the patient's listed slides.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from preprocessing.core.errors import InputError
from preprocessing.omics.barcodes import describe_rows
from preprocessing.omics.clinical import event_values, finish_clinical, patients_from, time_values
from preprocessing.omics.cohort_tables import MODALITIES, CohortTables, drop_empty_rows
from preprocessing.omics.files import numeric_values, read_table
from preprocessing.slides.files import slide_stem

MCAT_SUFFIXES = {"_rnaseq": "rna", "_cnv": "cnv", "_mut": "mut"}
MCAT_REQUIRED = ("case_id", "survival_months", "censorship")


def read_mcat(path: str | Path) -> CohortTables:
    """Read the MCAT/PORPOISE one-row-per-slide table (see the module docstring)."""
    path = Path(path)
    frame = read_table(path)
    missing = [c for c in MCAT_REQUIRED if c not in frame.columns]
    if missing:
        raise InputError(path, f"not an MCAT-style table: no column(s) {', '.join(missing)} "
                               "(give a folder for separate clinical/omic tables)")
    patients = patients_from(frame["case_id"], path, "case_id")
    censorship = event_values(frame["censorship"], path, "censorship")
    rows = pd.DataFrame({
        "patient": patients,
        "time": time_values(frame["survival_months"], path, "survival_months", patients),
        "event": 1.0 - censorship,
        "source": str(path),
    })
    for name in ("age", "is_female"):
        if name in frame.columns:
            rows[name] = numeric_values(frame[[name]], path, f"clinical value ({name})", patients)[name]
    clinical, dropped = finish_clinical(rows)
    omics, genes = _omic_tables(frame, path, patients)
    listed: dict[str, list[str]] = {}
    if "slide_id" in frame.columns:
        for patient, slide in zip(patients, frame["slide_id"], strict=True):
            if pd.notna(slide):
                listed.setdefault(patient, []).append(slide_stem(str(slide).strip()))
    notes = {m: {"genes": len(genes[m])} for m in omics}
    return CohortTables("mcat", clinical, omics, {"table": str(path)}, listed, dropped, notes)


def _omic_tables(frame: pd.DataFrame, path: Path,
                 patients: pd.Series) -> tuple[dict[str, pd.DataFrame], dict[str, list[str]]]:
    """(modality -> patients x genes, modality -> gene names) from the ``{gene}_{suffix}`` columns;
    InputError when two rows of one patient disagree."""
    omic_cols: dict[str, list[str]] = {m: [] for m in MODALITIES}
    genes: dict[str, list[str]] = {m: [] for m in MODALITIES}
    for col in frame.columns:
        for suffix, modality in MCAT_SUFFIXES.items():
            if str(col).endswith(suffix) and len(str(col)) > len(suffix):
                omic_cols[modality].append(col)
                genes[modality].append(str(col)[: -len(suffix)])
    all_cols = [c for m in MODALITIES for c in omic_cols[m]]
    omics: dict[str, pd.DataFrame] = {}
    if all_cols:
        values = numeric_values(frame[all_cols], path, "omic value", patients)
        values.insert(0, "_patient", patients)
        unique = values.drop_duplicates()
        conflict = unique["_patient"][unique["_patient"].duplicated()].unique()
        if len(conflict):
            raise InputError(path, "conflicting omic values in different rows of patient(s) "
                                   f"{describe_rows(conflict)}")
        unique = unique.set_index("_patient")
        unique.index.name = "patient"
        for modality in MODALITIES:
            if omic_cols[modality]:
                table = unique[omic_cols[modality]].set_axis(genes[modality], axis=1)
                omics[modality] = drop_empty_rows(table).sort_index()
    return omics, genes
