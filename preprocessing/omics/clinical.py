"""Clinical tables: per-patient survival (months, event) and the age / sex covariates.

Survival is read from ``OS.time`` (days) + ``OS`` (1 = death) [Xena], ``OS_MONTHS`` + ``OS_STATUS``
(``1:DECEASED``) [cBioPortal], ``survival_months`` + ``censorship`` [MCAT], or ``vital_status`` +
``days_to_death`` / ``days_to_last_follow_up`` [GDC; ``cases.``/``demographic.`` prefixes allowed].
The patient comes from ``_PATIENT``, ``PATIENT_ID``, ``bcr_patient_barcode``, ``case_submitter_id``
... or a sample column. Several clinical tables are merged per patient (survival must agree).

Times are returned in months (days / 30.4375); missing time or status drops the patient (logged
warning, listed in the summary); a negative or non-numeric time, an unknown status and one patient
with two different survival records are errors naming the table and the patients.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from preprocessing.core.errors import InputError
from preprocessing.omics.barcodes import describe_rows, is_barcode, parse_barcode
from preprocessing.omics.files import find_column, numeric_values, read_table

log = logging.getLogger(__name__)

DAYS_PER_MONTH = 30.4375
# clinical placeholders used by TCGA biotab / GDC exports for "no value"
CLINICAL_NA = ["'--", "--", "[Not Available]", "[Not Applicable]", "[Unknown]", "[Discrepancy]",
               "[Not Evaluated]", "[Not Reported]", "Not Reported", "not reported", "Unknown", "unknown"]
PATIENT_COLUMNS = ("_PATIENT", "PATIENT_ID", "bcr_patient_barcode", "case_submitter_id", "submitter_id",
                   "patient", "patient_id", "case_id")
SAMPLE_COLUMNS = ("sample", "SAMPLE_ID", "sampleID", "sample_id", "bcr_sample_barcode")


def event_values(values: pd.Series, source: Path, column: str) -> pd.Series:
    """Map a vital status column to 1 (death) / 0 (alive or censored) / NaN; unknown words are errors."""
    if pd.api.types.is_numeric_dtype(values):
        bad = values.notna() & ~values.isin([0, 1])
        if bad.any():
            found = describe_rows(values[bad].unique())
            raise InputError(source, f"column {column} must be 0 or 1, found {found}")
        return values.astype(float)
    text = values.astype("string").str.strip().str.lower()
    mapped = pd.Series(np.nan, index=values.index)
    dead = text.str.match(r"^(1(\.0)?|1:.*|dead|deceased)$", na=False)
    alive = text.str.match(r"^(0(\.0)?|0:.*|alive|living)$", na=False)
    mapped[dead] = 1.0
    mapped[alive] = 0.0
    bad = text.notna() & ~(dead | alive)
    if bad.any():
        found = describe_rows(values[bad].unique())
        raise InputError(source, f"column {column}: unknown status value(s) {found} "
                                 "(expected 1/0, Dead/Alive or 1:DECEASED/0:LIVING)")
    return mapped


def time_values(values: pd.Series, source: Path, column: str, patients: pd.Series) -> pd.Series:
    """Survival times as float; non-numeric or negative values are errors naming the patients."""
    numeric = pd.to_numeric(values, errors="coerce")
    bad = numeric.isna() & values.notna()
    if bad.any():
        raise InputError(source, f"non-numeric survival time in column {column} for patient(s) "
                                 f"{describe_rows(patients[bad])} (e.g. {values[bad].iloc[0]!r})")
    infinite = np.isinf(numeric)
    if infinite.any():
        raise InputError(source, f"infinite survival time in column {column} for patient(s) "
                                 f"{describe_rows(patients[infinite])}")
    negative = numeric < 0
    if negative.any():
        raise InputError(source, f"negative survival time in column {column} for patient(s) "
                                 f"{describe_rows(patients[negative])}")
    return numeric.astype(float)


def patients_from(values: pd.Series, source: Path, column: str) -> pd.Series:
    """12-character patients of a barcode column; InputError naming rows that are no barcode."""
    parsed = values.map(lambda v: parse_barcode(v) if pd.notna(v) else None)
    bad = parsed.isna()
    if bad.any():
        lines = [f"line {i + 2} ({values[i]!r})" for i in values.index[bad]]
        raise InputError(source, f"column {column}: not a TCGA barcode at {describe_rows(lines)}")
    return parsed.map(lambda p: p.patient)


def per_patient_survival(rows: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Collapse row-level survival (patient, time, event, source) to one record per patient.

    Rows without time or status are ignored; a patient with none left is dropped (returned list).
    Two different records for one patient raise InputError naming the table(s) and patients.
    """
    complete = rows.dropna(subset=["time", "event"]).copy()
    complete["_t"] = complete["time"].round(6)
    counts = complete.groupby("patient")[["_t", "event"]].nunique()
    conflicting = counts.index[(counts["_t"] > 1) | (counts["event"] > 1)]
    if len(conflicting):
        sub = complete[complete["patient"].isin(conflicting)]
        sources = " and ".join(sorted(sub["source"].unique()))
        first = sub[sub["patient"] == conflicting[0]]
        detail = "; ".join(f"{t:g} months/event {int(e)}"
                           for t, e in zip(first["time"], first["event"], strict=True))
        raise InputError(sources, f"conflicting survival for patient(s) {describe_rows(conflicting)} "
                                  f"(e.g. {conflicting[0]}: {detail})")
    survival = complete.groupby("patient")[["time", "event"]].first()
    survival["event"] = survival["event"].astype(np.int64)
    dropped = sorted(set(rows["patient"]) - set(survival.index))
    return survival.sort_index(), dropped


def _covariates(rows: pd.DataFrame) -> pd.DataFrame:
    """First known age / is_female per patient."""
    cols = [c for c in ("age", "is_female") if c in rows.columns]
    if not cols:
        return pd.DataFrame(index=pd.Index([], name="patient"))
    return rows.groupby("patient")[cols].first()


def finish_clinical(rows: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Row-level records -> (per-patient clinical table, patients dropped for want of survival)."""
    survival, dropped = per_patient_survival(rows)
    if dropped:
        log.warning("%d patient(s) without survival time or status dropped: %s", len(dropped),
                    describe_rows(dropped))
    if survival.empty:
        sources = " and ".join(sorted(rows["source"].unique()))
        raise InputError(sources, "no patient has a survival time and status")
    clinical = survival.join(_covariates(rows), how="left")
    clinical.index.name = "patient"
    return clinical, dropped


def read_clinical(path: str | Path) -> pd.DataFrame:
    """Row-level clinical records of one table: patient, time (months), event, age, is_female, source.

    ``time``/``event`` are all NaN when the table has no recognised survival columns.
    """
    path = Path(path)
    frame = read_table(path, na_values=CLINICAL_NA)
    pcol = _patient_column(frame, path)
    frame = frame[frame[pcol].notna()].reset_index(drop=True)
    if frame.empty:
        raise InputError(path, f"column {pcol} is empty")
    patients = patients_from(frame[pcol], path, pcol)
    rows = pd.DataFrame({"patient": patients, "time": np.nan, "event": np.nan, "source": str(path)})
    has_survival = _read_survival(frame, path, patients, rows)
    _read_covariates(frame, path, patients, rows)
    rows.attrs["has_survival"] = has_survival
    return rows


def _patient_column(frame: pd.DataFrame, path: Path) -> str:
    """The column naming each row's patient: a patient column of barcodes, else a sample column,
    else a first column of barcodes."""
    pcol = find_column(frame, PATIENT_COLUMNS)
    if pcol is not None and not frame[pcol].dropna().map(is_barcode).any():
        pcol = None  # e.g. GDC's case_id is a UUID: fall through to a barcode column
    # (a barcode column with some bad values stays: patients_from names those rows)
    if pcol is None:
        pcol = find_column(frame, SAMPLE_COLUMNS)
    if pcol is None and frame[frame.columns[0]].dropna().map(is_barcode).all():
        pcol = frame.columns[0]
    if pcol is None:
        expected = ", ".join(PATIENT_COLUMNS + SAMPLE_COLUMNS)
        raise InputError(path, f"no patient column: expected one of {expected}")
    return pcol


def _read_survival(frame: pd.DataFrame, path: Path, patients: pd.Series, rows: pd.DataFrame) -> bool:
    """Fill ``rows``' time (months) and event from the first survival convention ``frame`` follows;
    False when it follows none."""
    xena = (find_column(frame, ["OS.time"]), find_column(frame, ["OS"]))
    cbio = (find_column(frame, ["OS_MONTHS"]), find_column(frame, ["OS_STATUS"]))
    mcat = (find_column(frame, ["survival_months"]), find_column(frame, ["censorship"]))
    vital = find_column(frame, ["vital_status"])
    if all(xena):
        rows["time"] = time_values(frame[xena[0]], path, xena[0], patients) / DAYS_PER_MONTH
        rows["event"] = event_values(frame[xena[1]], path, xena[1])
    elif all(cbio):
        rows["time"] = time_values(frame[cbio[0]], path, cbio[0], patients)
        rows["event"] = event_values(frame[cbio[1]], path, cbio[1])
    elif all(mcat):
        rows["time"] = time_values(frame[mcat[0]], path, mcat[0], patients)
        rows["event"] = 1.0 - event_values(frame[mcat[1]], path, mcat[1])
    elif vital is not None:
        event = event_values(frame[vital], path, vital)
        death_col = find_column(frame, ["days_to_death"])
        follow_col = find_column(frame, ["days_to_last_follow_up", "days_to_last_followup"])
        death = (time_values(frame[death_col], path, death_col, patients) if death_col
                 else pd.Series(np.nan, index=frame.index))
        follow = (time_values(frame[follow_col], path, follow_col, patients) if follow_col
                  else pd.Series(np.nan, index=frame.index))
        rows["event"] = event
        rows["time"] = np.where(event == 1, death, np.where(event == 0, follow, np.nan)) / DAYS_PER_MONTH
    return bool(all(xena) or all(cbio) or all(mcat) or vital is not None)


def _read_covariates(frame: pd.DataFrame, path: Path, patients: pd.Series, rows: pd.DataFrame) -> None:
    """Fill ``rows``' age (years) and is_female (1/0) when ``frame`` has them."""
    age_col = find_column(frame, ["age", "age_at_initial_pathologic_diagnosis", "age_at_index"])
    if age_col is not None:
        rows["age"] = numeric_values(frame[[age_col]], path, f"clinical value ({age_col})", patients)[age_col]
    elif (days_col := find_column(frame, ["age_at_diagnosis"])) is not None:  # GDC: in days
        days = numeric_values(frame[[days_col]], path, f"clinical value ({days_col})", patients)[days_col]
        rows["age"] = days / 365.25
    female_col = find_column(frame, ["is_female"])
    sex_col = find_column(frame, ["gender", "sex"])
    if female_col is not None:
        female = numeric_values(frame[[female_col]], path, "clinical value (is_female)", patients)
        rows["is_female"] = female[female_col]
    elif sex_col is not None:
        sex = frame[sex_col].astype("string").str.strip().str.lower()
        rows["is_female"] = sex.map({"female": 1.0, "f": 1.0, "male": 0.0, "m": 0.0}).astype(float)
