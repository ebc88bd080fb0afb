"""Read clinical and omic tables into per-patient frames, from either of two layouts.

**MCAT layout** (one file: ``.csv``, ``.csv.zip``, ``.csv.gz``, ``.tsv``): one row per slide with
``case_id``, ``slide_id``, ``survival_months``, ``censorship`` (1 = censored), then gene columns
``{gene}_rnaseq``, ``{gene}_cnv``, ``{gene}_mut``. Every other column (``age``, ``is_female``,
``site``, ``oncotree_code``, stray ``Unnamed: 0`` index columns, train flags) is not an omic feature;
``age`` and ``is_female`` are kept as clinical covariates.

**Folder layout** (tables as downloaded from UCSC Xena, cBioPortal or GDC), files recognised by name
(lower case, compression suffix ignored; ``.tsv``/``.txt``/``.tab``/``.maf`` are tab-separated,
``.csv`` comma-separated; leading ``#`` lines are skipped; ``meta_*`` files and other names are
ignored with a log line):

- clinical: name contains ``clinical``, ``survival`` or ``phenotype``. Survival from ``OS.time``
  (days) + ``OS`` (1 = death) [Xena], ``OS_MONTHS`` + ``OS_STATUS`` (``1:DECEASED``) [cBioPortal],
  ``survival_months`` + ``censorship`` [MCAT], or ``vital_status`` + ``days_to_death`` /
  ``days_to_last_follow_up`` [GDC; ``cases.``/``demographic.`` prefixes allowed]. Patient from
  ``_PATIENT``, ``PATIENT_ID``, ``bcr_patient_barcode``, ``case_submitter_id`` ... or a sample column.
  Several clinical files are merged per patient (survival must agree).
- mutations: ``*.maf`` or name contains ``mut``/``maf``/``snv``/``somatic``: a MAF (``Hugo_Symbol``,
  ``Tumor_Sample_Barcode``, ``Variant_Classification``) or a binary matrix.
- copy number: name contains ``cnv``, ``cna``, ``copy`` or ``gistic``.
- expression: name contains ``rna``, ``expr``, ``fpkm``, ``tpm``, ``rsem``, ``htseq`` or ``counts``.

Expression and copy-number tables are gene x sample matrices (first non-barcode column = gene
symbol; cBioPortal's ``Hugo_Symbol``/``Entrez_Gene_Id`` pair accepted, the ID column dropped) or,
when no header is a barcode, sample x gene matrices with barcodes in the first column. At most one
table per omic modality. Samples are reduced to one tumour sample per patient by the rule in
:mod:`preprocessing.omics.barcodes`; duplicate gene rows keep the first one.

MAF: a gene counts as mutated (1) in a patient when the chosen tumour sample carries a
non-synonymous variant (``NON_SILENT``: frame shifts, in-frame indels, missense, nonsense, nonstop,
splice site, translation start site); silent, UTR, intron, flank, IGR, RNA and splice-region
variants are excluded by default. Patients that appear in the MAF (with any variant) have mutation
data (0 elsewhere); patients absent from it have none (NaN).

Survival: times are returned in months (days / 30.4375); missing time or status drops the patient
(logged warning, listed in the summary); a negative or non-numeric time, an unknown status and one
patient with two different survival records are errors naming the table and the patients.
"""

from __future__ import annotations

import bz2
import gzip
import io
import logging
import lzma
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from preprocessing.core.errors import InputError
from preprocessing.omics.barcodes import choose_samples, describe_rows, is_barcode, parse_barcode
from preprocessing.slides.files import SLIDE_SUFFIXES

log = logging.getLogger(__name__)

MODALITIES = ("rna", "cnv", "mut")
DAYS_PER_MONTH = 30.4375
MCAT_SUFFIXES = {"_rnaseq": "rna", "_cnv": "cnv", "_mut": "mut"}
MCAT_REQUIRED = ("case_id", "survival_months", "censorship")
TABLE_EXTS = (".csv", ".tsv", ".txt", ".tab", ".maf")
COMPRESSION_EXTS = (".zip", ".gz", ".bz2", ".xz")
NON_SILENT = frozenset(
    {
        "Frame_Shift_Del",
        "Frame_Shift_Ins",
        "In_Frame_Del",
        "In_Frame_Ins",
        "Missense_Mutation",
        "Nonsense_Mutation",
        "Nonstop_Mutation",
        "Splice_Site",
        "Translation_Start_Site",
    }
)
# clinical placeholders used by TCGA biotab / GDC exports for "no value"
CLINICAL_NA = ["'--", "--", "[Not Available]", "[Not Applicable]", "[Unknown]", "[Discrepancy]",
               "[Not Evaluated]", "[Not Reported]", "Not Reported", "not reported", "Unknown", "unknown"]
FILE_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("clinical", ("clinical", "survival", "phenotype")),
    ("mut", ("mut", "maf", "snv", "somatic")),
    ("cnv", ("cnv", "cna", "copy", "gistic")),
    ("rna", ("rna", "expr", "fpkm", "tpm", "rsem", "htseq", "counts")),
)
GENE_COLUMNS = ("Hugo_Symbol", "gene", "Gene", "gene_symbol", "Gene Symbol", "symbol", "sample", "gene_id")
PATIENT_COLUMNS = ("_PATIENT", "PATIENT_ID", "bcr_patient_barcode", "case_submitter_id", "submitter_id",
                   "patient", "patient_id", "case_id")
SAMPLE_COLUMNS = ("sample", "SAMPLE_ID", "sampleID", "sample_id", "bcr_sample_barcode")


@dataclass
class CohortTables:
    """Everything read from the omics input, per patient, before slides and splits are joined.

    ``clinical``: index ``patient`` (sorted), columns ``time`` (months), ``event`` (0/1) and, when the
    input has them, ``age`` and ``is_female``; patients without survival are already dropped and
    listed in ``dropped_no_survival``. ``omics``: modality -> patients x genes (float64), only
    patients that have that modality. ``listed_slides``: slide stems named by the table (MCAT).
    """

    layout: str
    clinical: pd.DataFrame
    omics: dict[str, pd.DataFrame]
    sources: dict[str, str]
    listed_slides: dict[str, list[str]] = field(default_factory=dict)
    dropped_no_survival: list[str] = field(default_factory=list)
    notes: dict[str, dict[str, Any]] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- files


def _base_name(path: Path) -> str:
    """Lower-case file name without a compression suffix."""
    name = path.name.lower()
    for ext in COMPRESSION_EXTS:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _open_text(path: Path) -> IO[str]:
    """Open a possibly compressed text file for reading lines."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rt", errors="replace")
    if name.endswith(".bz2"):
        return bz2.open(path, "rt", errors="replace")
    if name.endswith(".xz"):
        return lzma.open(path, "rt", errors="replace")
    if name.endswith(".zip"):
        archive = zipfile.ZipFile(path)
        members = [n for n in archive.namelist() if not n.endswith("/")]
        if len(members) != 1:
            raise InputError(path, f"a zipped table must hold exactly one file, found {len(members)}")
        return io.TextIOWrapper(archive.open(members[0]), errors="replace")
    return open(path, errors="replace")  # noqa: SIM115 - closed by the caller's with-block


def _leading_comment_lines(path: Path) -> int:
    """How many lines starting with '#' precede the header (MAF version lines, cBioPortal headers)."""
    count = 0
    try:
        with _open_text(path) as handle:
            for line in handle:
                if not line.startswith("#"):
                    break
                count += 1
    except (OSError, zipfile.BadZipFile, EOFError, lzma.LZMAError) as err:
        raise InputError(path, f"cannot read file: {err}") from err
    return count


def read_table(
    path: str | Path,
    usecols: Callable[[str], bool] | None = None,
    na_values: Iterable[str] | None = None,
    nrows: int | None = None,
) -> pd.DataFrame:
    """Read a delimited table (separator from the extension), skipping leading '#' lines.

    Raises InputError naming the file when it is missing, unreadable or holds no data rows.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    base = _base_name(path)
    if not base.endswith(TABLE_EXTS):
        raise InputError(path, f"unknown table format: expected one of {', '.join(TABLE_EXTS)} "
                               f"(optionally {', '.join(COMPRESSION_EXTS)})")
    sep = "," if base.endswith(".csv") else "\t"
    skip = _leading_comment_lines(path)
    try:
        frame = pd.read_csv(path, sep=sep, skiprows=skip, usecols=usecols, na_values=na_values,
                            nrows=nrows, low_memory=False)
    except pd.errors.EmptyDataError as err:
        raise InputError(path, "empty table (no header)") from err
    except (EOFError, zlib.error, lzma.LZMAError) as err:  # a truncated or damaged .gz/.xz/.bz2 download
        raise InputError(path, f"damaged compressed file: {err}") from err
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise InputError(path, f"cannot parse table: {str(err).strip().splitlines()[0]}") from err
    if nrows != 0 and frame.empty:
        raise InputError(path, "empty table: a header but no data rows")
    return frame


def classify_file(path: Path) -> str | None:
    """Which table a folder file is, from its name: clinical, rna, cnv, mut, or None (ignored)."""
    base = _base_name(path)
    if path.name.startswith(".") or base.startswith("meta_") or not base.endswith(TABLE_EXTS):
        return None
    if base.endswith(".maf"):
        return "mut"
    for kind, words in FILE_KINDS:
        if any(word in base for word in words):
            return kind
    return None


# ------------------------------------------------------------------------------------- checks


def _numeric(frame: pd.DataFrame, source: Path, what: str, row_names: pd.Index | None = None) -> pd.DataFrame:
    """``frame`` as float64; InputError naming columns and rows that hold non-numeric or infinite
    values (``-Inf`` is what R writes for log2(0): left in, it would become a training mean of -inf
    and every held-out patient's value inf)."""
    text_cols = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if not text_cols:
        return _finite(frame.astype(np.float64), source, what, row_names)
    converted = frame[text_cols].apply(pd.to_numeric, errors="coerce")
    bad = converted.isna() & frame[text_cols].notna()
    if bad.to_numpy().any():
        cols = [c for c in text_cols if bad[c].any()]
        rows_mask = bad.any(axis=1).to_numpy()
        names = (row_names if row_names is not None else frame.index)[rows_mask]
        example = frame.loc[bad[cols[0]], cols[0]].iloc[0]
        raise InputError(source, f"non-numeric {what} (e.g. {example!r}) in column(s) {describe_rows(cols)}, "
                                 f"row(s) {describe_rows(names)}")
    out = frame.copy()
    out[text_cols] = converted
    return _finite(out.astype(np.float64), source, what, row_names)


def _finite(frame: pd.DataFrame, source: Path, what: str, row_names: pd.Index | None) -> pd.DataFrame:
    infinite = np.isinf(frame.to_numpy())
    if infinite.any():
        cols = frame.columns[infinite.any(axis=0)]
        names = (row_names if row_names is not None else frame.index)[infinite.any(axis=1)]
        example = frame.to_numpy()[infinite][0]
        raise InputError(source, f"infinite {what} (e.g. {example}) in column(s) {describe_rows(cols)}, "
                                 f"row(s) {describe_rows(names)}: mark unmeasured values as empty or NA")
    return frame


def _find_column(frame: pd.DataFrame, names: Iterable[str]) -> str | None:
    """First column equal to one of ``names`` (case-insensitive), else one ending in ``.name``."""
    names = list(names)
    lower = {str(c).lower(): c for c in frame.columns}
    for name in names:
        if name.lower() in lower:
            return lower[name.lower()]
    for name in names:
        for col in frame.columns:
            if str(col).lower().endswith("." + name.lower()):
                return col
    return None


def _event_values(values: pd.Series, source: Path, column: str) -> pd.Series:
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


def _time_values(values: pd.Series, source: Path, column: str, patients: pd.Series) -> pd.Series:
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


def _patients_from(values: pd.Series, source: Path, column: str) -> pd.Series:
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


def _finish_clinical(rows: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
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


def _drop_empty_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Patients whose values are all missing do not have this modality."""
    return frame[frame.notna().any(axis=1)]


# --------------------------------------------------------------------------------- MCAT layout


def read_mcat(path: str | Path) -> CohortTables:
    """Read the MCAT/PORPOISE one-row-per-slide table (see the module docstring)."""
    path = Path(path)
    frame = read_table(path)
    missing = [c for c in MCAT_REQUIRED if c not in frame.columns]
    if missing:
        raise InputError(path, f"not an MCAT-style table: no column(s) {', '.join(missing)} "
                               "(give a folder for separate clinical/omic tables)")
    patients = _patients_from(frame["case_id"], path, "case_id")
    censorship = _event_values(frame["censorship"], path, "censorship")
    rows = pd.DataFrame({
        "patient": patients,
        "time": _time_values(frame["survival_months"], path, "survival_months", patients),
        "event": 1.0 - censorship,
        "source": str(path),
    })
    for name in ("age", "is_female"):
        if name in frame.columns:
            rows[name] = _numeric(frame[[name]], path, f"clinical value ({name})", patients)[name]
    clinical, dropped = _finish_clinical(rows)

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
        values = _numeric(frame[all_cols], path, "omic value", patients)
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
                omics[modality] = _drop_empty_rows(table).sort_index()
    listed: dict[str, list[str]] = {}
    if "slide_id" in frame.columns:
        for patient, slide in zip(patients, frame["slide_id"], strict=True):
            if pd.notna(slide):
                listed.setdefault(patient, []).append(slide_stem(str(slide).strip()))
    notes = {m: {"genes": len(genes[m])} for m in omics}
    return CohortTables("mcat", clinical, omics, {"table": str(path)}, listed, dropped, notes)


def slide_stem(name: str) -> str:
    """A slide file name without its extension (``x.svs`` -> ``x``); a bare stem is returned as is."""
    path = Path(name)
    return path.stem if path.suffix.lower() in SLIDE_SUFFIXES else path.name


# ------------------------------------------------------------------------------- folder layout


def read_clinical(path: str | Path) -> pd.DataFrame:
    """Row-level clinical records of one table: patient, time (months), event, age, is_female, source.

    ``time``/``event`` are all NaN when the table has no recognised survival columns.
    """
    path = Path(path)
    frame = read_table(path, na_values=CLINICAL_NA)
    pcol = _find_column(frame, PATIENT_COLUMNS)
    if pcol is not None and not frame[pcol].dropna().map(is_barcode).any():
        pcol = None  # e.g. GDC's case_id is a UUID: fall through to a barcode column
    # (a barcode column with some bad values stays: _patients_from names those rows)
    if pcol is None:
        pcol = _find_column(frame, SAMPLE_COLUMNS)
    if pcol is None and frame[frame.columns[0]].dropna().map(is_barcode).all():
        pcol = frame.columns[0]
    if pcol is None:
        expected = ", ".join(PATIENT_COLUMNS + SAMPLE_COLUMNS)
        raise InputError(path, f"no patient column: expected one of {expected}")
    frame = frame[frame[pcol].notna()].reset_index(drop=True)
    if frame.empty:
        raise InputError(path, f"column {pcol} is empty")
    patients = _patients_from(frame[pcol], path, pcol)
    rows = pd.DataFrame({"patient": patients, "time": np.nan, "event": np.nan, "source": str(path)})

    xena = (_find_column(frame, ["OS.time"]), _find_column(frame, ["OS"]))
    cbio = (_find_column(frame, ["OS_MONTHS"]), _find_column(frame, ["OS_STATUS"]))
    mcat = (_find_column(frame, ["survival_months"]), _find_column(frame, ["censorship"]))
    vital = _find_column(frame, ["vital_status"])
    if all(xena):
        rows["time"] = _time_values(frame[xena[0]], path, xena[0], patients) / DAYS_PER_MONTH
        rows["event"] = _event_values(frame[xena[1]], path, xena[1])
    elif all(cbio):
        rows["time"] = _time_values(frame[cbio[0]], path, cbio[0], patients)
        rows["event"] = _event_values(frame[cbio[1]], path, cbio[1])
    elif all(mcat):
        rows["time"] = _time_values(frame[mcat[0]], path, mcat[0], patients)
        rows["event"] = 1.0 - _event_values(frame[mcat[1]], path, mcat[1])
    elif vital is not None:
        event = _event_values(frame[vital], path, vital)
        death_col = _find_column(frame, ["days_to_death"])
        follow_col = _find_column(frame, ["days_to_last_follow_up", "days_to_last_followup"])
        death = (_time_values(frame[death_col], path, death_col, patients) if death_col
                 else pd.Series(np.nan, index=frame.index))
        follow = (_time_values(frame[follow_col], path, follow_col, patients) if follow_col
                  else pd.Series(np.nan, index=frame.index))
        rows["event"] = event
        rows["time"] = np.where(event == 1, death, np.where(event == 0, follow, np.nan)) / DAYS_PER_MONTH

    age_col = _find_column(frame, ["age", "age_at_initial_pathologic_diagnosis", "age_at_index"])
    if age_col is not None:
        rows["age"] = _numeric(frame[[age_col]], path, f"clinical value ({age_col})", patients)[age_col]
    elif (days_col := _find_column(frame, ["age_at_diagnosis"])) is not None:  # GDC: in days
        days = _numeric(frame[[days_col]], path, f"clinical value ({days_col})", patients)[days_col]
        rows["age"] = days / 365.25
    female_col = _find_column(frame, ["is_female"])
    sex_col = _find_column(frame, ["gender", "sex"])
    if female_col is not None:
        female = _numeric(frame[[female_col]], path, "clinical value (is_female)", patients)
        rows["is_female"] = female[female_col]
    elif sex_col is not None:
        sex = frame[sex_col].astype("string").str.strip().str.lower()
        rows["is_female"] = sex.map({"female": 1.0, "f": 1.0, "male": 0.0, "m": 0.0}).astype(float)
    rows.attrs["has_survival"] = bool(all(xena) or all(cbio) or all(mcat) or vital is not None)
    return rows


def _samples_to_patients(
    matrix: pd.DataFrame, source: Path, modality: str
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Reduce a samples x genes matrix to one tumour sample per patient (barcodes module rule)."""
    if matrix.index.duplicated().any():
        dups = matrix.index[matrix.index.duplicated()].unique()
        raise InputError(source, f"sample(s) listed twice: {describe_rows(dups)}")
    choose_samples(matrix.index, source)  # every label must be a barcode, measured or not
    # A sample with no value at all (e.g. an all-NA column of a gene x sample matrix) is not a
    # measurement: leaving it in could make it the patient's chosen sample over a measured one.
    unmeasured = [str(s) for s in matrix.index[matrix.isna().all(axis=1)]]
    choice = choose_samples(matrix.index.difference(unmeasured, sort=False), source)
    picked = matrix.loc[list(choice.chosen.values())]
    picked.index = pd.Index(list(choice.chosen.keys()), name="patient")
    if choice.normals_ignored:
        log.info("%s: %d normal/control sample(s) ignored", source.name, len(choice.normals_ignored))
    if choice.duplicates_dropped:
        log.info("%s: %d extra tumour sample(s) of the same patients not used: %s", source.name,
                 len(choice.duplicates_dropped), describe_rows(choice.duplicates_dropped))
    notes = {
        "samples": int(len(matrix)),
        "normal_samples_ignored": choice.normals_ignored,
        "duplicate_samples_not_used": choice.duplicates_dropped,
        "samples_without_values": unmeasured,
        "chosen_samples": dict(sorted(choice.chosen.items())),
    }
    return _drop_empty_rows(picked).sort_index(), notes


def read_matrix(path: str | Path, modality: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a gene x sample (or sample x gene) matrix as patients x genes (float64) plus notes."""
    path = Path(path)
    frame = read_table(path)
    columns = [str(c) for c in frame.columns]
    frame.columns = columns
    samples = [c for c in columns if is_barcode(c)]
    if samples:
        others = [c for c in columns if c not in set(samples)]
        broken = [c for c in others if c.upper().startswith("TCGA")]
        if broken:
            raise InputError(path, f"column header(s) that are not valid TCGA barcodes: "
                                   f"{describe_rows(broken)}")
        if not others:
            raise InputError(path, "no gene column: the first column must hold gene symbols")
        gene_col = next((c for c in GENE_COLUMNS if c in others), others[0])
        genes = frame[gene_col]
        keep = genes.notna() & (genes.astype(str).str.strip() != "")
        frame = frame[keep]
        genes = genes[keep].astype(str).str.strip()
        values = _numeric(frame[samples], path, f"{modality} value", pd.Index(genes))
        values.index = pd.Index(genes)
        matrix = values.T
    else:
        first = columns[0]
        ids = frame[first]
        if not (ids.notna().all() and ids.map(is_barcode).all()):
            raise InputError(path, "no TCGA sample barcodes in the header (gene x sample matrix) "
                                   "or in the first column (sample x gene matrix)")
        values = _numeric(frame[columns[1:]], path, f"{modality} value", pd.Index(ids))
        values.index = pd.Index(ids.astype(str))
        matrix = values
    duplicated = matrix.columns.duplicated()
    if duplicated.any():
        log.info("%s: %d duplicate gene row(s); the first of each is kept", path.name, int(duplicated.sum()))
        matrix = matrix.loc[:, ~duplicated]
    matrix.columns.name = None
    patients, notes = _samples_to_patients(matrix, path, modality)
    notes["genes"] = int(patients.shape[1])
    return patients, notes


def read_mutations(path: str | Path, include_silent: bool = False) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Binary patients x genes mutation matrix from a MAF (non-silent variants) or a 0/1 matrix."""
    path = Path(path)
    header = [str(c) for c in read_table(path, nrows=0).columns]
    is_maf = {"Hugo_Symbol", "Tumor_Sample_Barcode"} <= set(header)
    if not is_maf:
        if _base_name(path).endswith(".maf"):
            raise InputError(path, "MAF without Hugo_Symbol and Tumor_Sample_Barcode columns")
        matrix, notes = read_matrix(path, "mut")
        return (matrix > 0).astype(np.float64).where(matrix.notna()), notes
    wanted = {"Hugo_Symbol", "Tumor_Sample_Barcode", "Variant_Classification"}
    maf = read_table(path, usecols=lambda c: c in wanted)
    maf = maf[maf["Tumor_Sample_Barcode"].notna()]
    samples = pd.Index(maf["Tumor_Sample_Barcode"].astype(str).str.strip().unique())
    choice = choose_samples(samples, path)
    chosen = set(choice.chosen.values())
    sample_to_patient = {s: p for p, s in choice.chosen.items()}
    maf = maf[maf["Tumor_Sample_Barcode"].astype(str).str.strip().isin(chosen)].copy()
    maf["patient"] = maf["Tumor_Sample_Barcode"].astype(str).str.strip().map(sample_to_patient)
    n_all = len(maf)
    if "Variant_Classification" in maf.columns:
        if not include_silent:
            maf = maf[maf["Variant_Classification"].isin(NON_SILENT)]
    else:
        log.warning("%s: no Variant_Classification column: every variant counts as a mutation", path.name)
    maf = maf[maf["Hugo_Symbol"].notna() & ~maf["Hugo_Symbol"].isin(["Unknown", ""])]
    genes = sorted(maf["Hugo_Symbol"].astype(str).unique())
    patients = sorted(choice.chosen)
    matrix = pd.DataFrame(0.0, index=pd.Index(patients, name="patient"), columns=genes)
    if len(maf):
        hits = maf[["patient", "Hugo_Symbol"]].drop_duplicates()
        rows = matrix.index.get_indexer(hits["patient"])
        cols = matrix.columns.get_indexer(hits["Hugo_Symbol"].astype(str))
        values = matrix.to_numpy()
        values[rows, cols] = 1.0
        matrix = pd.DataFrame(values, index=matrix.index, columns=genes)
    notes = {
        "samples": int(len(samples)),
        "normal_samples_ignored": choice.normals_ignored,
        "duplicate_samples_not_used": choice.duplicates_dropped,
        "chosen_samples": dict(sorted(choice.chosen.items())),
        "variants_of_chosen_samples": int(n_all),
        "variants_counted": int(len(maf)),
        "silent_variants_excluded": not include_silent,
        "genes": len(genes),
    }
    return matrix, notes


def read_folder(folder: str | Path, include_silent: bool = False) -> CohortTables:
    """Read a folder of separate clinical / expression / copy-number / mutation tables."""
    folder = Path(folder)
    groups: dict[str, list[Path]] = {"clinical": [], **{m: [] for m in MODALITIES}}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        kind = classify_file(path)
        if kind is None:
            if not path.name.startswith("."):
                log.info("%s: not recognised as a clinical or omic table by its name; ignored", path)
            continue
        groups[kind].append(path)
    if not groups["clinical"]:
        raise InputError(folder, "no clinical table: expected a file named *clinical* or *survival* "
                                 "(.tsv/.txt/.csv) with survival columns")
    for modality in MODALITIES:
        if len(groups[modality]) > 1:
            names = ", ".join(p.name for p in groups[modality])
            raise InputError(folder, f"several {modality} tables ({names}): keep one per modality")
    tables = [read_clinical(p) for p in groups["clinical"]]
    if not any(t.attrs.get("has_survival") for t in tables):
        names = ", ".join(p.name for p in groups["clinical"])
        raise InputError(folder, f"no survival columns in {names}: expected OS.time + OS, "
                                 "OS_MONTHS + OS_STATUS, survival_months + censorship, "
                                 "or vital_status + days_to_death/days_to_last_follow_up")
    clinical, dropped = _finish_clinical(pd.concat(tables, ignore_index=True))
    omics: dict[str, pd.DataFrame] = {}
    notes: dict[str, dict[str, Any]] = {}
    sources = {"clinical": ", ".join(str(p) for p in groups["clinical"])}
    for modality in MODALITIES:
        if not groups[modality]:
            continue
        path = groups[modality][0]
        if modality == "mut":
            matrix, note = read_mutations(path, include_silent=include_silent)
        else:
            matrix, note = read_matrix(path, modality)
        omics[modality], notes[modality], sources[modality] = matrix, note, str(path)
    return CohortTables("folder", clinical, omics, sources, {}, dropped, notes)


def read_omics(path: str | Path, include_silent: bool = False) -> CohortTables:
    """Read the omics input: a folder of separate tables, or one MCAT-style table."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist")
    if path.is_dir():
        return read_folder(path, include_silent=include_silent)
    return read_mcat(path)
