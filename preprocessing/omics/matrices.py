"""Omic matrices of the folder layout: expression, copy number and mutations, as patients x genes.

Expression and copy-number tables are gene x sample matrices (first non-barcode column = gene
symbol; cBioPortal's ``Hugo_Symbol``/``Entrez_Gene_Id`` pair accepted, the ID column dropped) or,
when no header is a barcode, sample x gene matrices with barcodes in the first column. Samples are
reduced to one tumour sample per patient by the rule in :mod:`preprocessing.omics.barcodes`;
duplicate gene rows keep the first one.

Mutations come as a MAF (``Hugo_Symbol``, ``Tumor_Sample_Barcode``, ``Variant_Classification``) or a
binary matrix. From a MAF, a gene counts as mutated (1) in a patient when the chosen tumour sample
carries a non-synonymous variant (``NON_SILENT``: frame shifts, in-frame indels, missense, nonsense,
nonstop, splice site, translation start site); silent, UTR, intron, flank, IGR, RNA and
splice-region variants are excluded by default. Patients that appear in the MAF (with any variant)
have mutation data (0 elsewhere); patients absent from it have none (NaN).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from preprocessing.core.errors import InputError
from preprocessing.omics.barcodes import choose_samples, describe_rows, is_barcode
from preprocessing.omics.cohort_tables import drop_empty_rows
from preprocessing.omics.files import base_name, numeric_values, read_table

log = logging.getLogger(__name__)

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
GENE_COLUMNS = ("Hugo_Symbol", "gene", "Gene", "gene_symbol", "Gene Symbol", "symbol", "sample", "gene_id")


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
    return drop_empty_rows(picked).sort_index(), notes


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
        values = numeric_values(frame[samples], path, f"{modality} value", pd.Index(genes))
        values.index = pd.Index(genes)
        matrix = values.T
    else:
        first = columns[0]
        ids = frame[first]
        if not (ids.notna().all() and ids.map(is_barcode).all()):
            raise InputError(path, "no TCGA sample barcodes in the header (gene x sample matrix) "
                                   "or in the first column (sample x gene matrix)")
        values = numeric_values(frame[columns[1:]], path, f"{modality} value", pd.Index(ids))
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
        if base_name(path).endswith(".maf"):
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
