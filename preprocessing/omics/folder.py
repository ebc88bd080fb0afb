"""The folder layout: separate clinical and omic tables as downloaded from UCSC Xena, cBioPortal or GDC.

Files are recognised by name (lower case, compression suffix ignored; see
:mod:`preprocessing.omics.files` for the formats); ``meta_*`` files and other names are ignored with
a log line:

- clinical: name contains ``clinical``, ``survival`` or ``phenotype``
  (:mod:`preprocessing.omics.clinical`); several clinical tables are merged per patient.
- mutations: ``*.maf`` or name contains ``mut``/``maf``/``snv``/``somatic``.
- copy number: name contains ``cnv``, ``cna``, ``copy`` or ``gistic``.
- expression: name contains ``rna``, ``expr``, ``fpkm``, ``tpm``, ``rsem``, ``htseq`` or ``counts``.

At most one table per omic modality; how the omic tables are read is in
:mod:`preprocessing.omics.matrices`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from preprocessing.core.errors import InputError
from preprocessing.omics.clinical import finish_clinical, read_clinical
from preprocessing.omics.cohort_tables import MODALITIES, CohortTables
from preprocessing.omics.files import TABLE_EXTS, base_name
from preprocessing.omics.matrices import read_matrix, read_mutations

log = logging.getLogger(__name__)

FILE_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("clinical", ("clinical", "survival", "phenotype")),
    ("mut", ("mut", "maf", "snv", "somatic")),
    ("cnv", ("cnv", "cna", "copy", "gistic")),
    ("rna", ("rna", "expr", "fpkm", "tpm", "rsem", "htseq", "counts")),
)


def classify_file(path: Path) -> str | None:
    """Which table a folder file is, from its name: clinical, rna, cnv, mut, or None (ignored)."""
    base = base_name(path)
    if path.name.startswith(".") or base.startswith("meta_") or not base.endswith(TABLE_EXTS):
        return None
    if base.endswith(".maf"):
        return "mut"
    for kind, words in FILE_KINDS:
        if any(word in base for word in words):
            return kind
    return None


def _group_files(folder: Path) -> dict[str, list[Path]]:
    """The folder's files by kind (clinical and each modality); InputError without a clinical table
    or with two tables of one modality."""
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
    return groups


def read_folder(folder: str | Path, include_silent: bool = False) -> CohortTables:
    """Read a folder of separate clinical / expression / copy-number / mutation tables."""
    folder = Path(folder)
    groups = _group_files(folder)
    tables = [read_clinical(p) for p in groups["clinical"]]
    if not any(t.attrs.get("has_survival") for t in tables):
        names = ", ".join(p.name for p in groups["clinical"])
        raise InputError(folder, f"no survival columns in {names}: expected OS.time + OS, "
                                 "OS_MONTHS + OS_STATUS, survival_months + censorship, "
                                 "or vital_status + days_to_death/days_to_last_follow_up")
    clinical, dropped = finish_clinical(pd.concat(tables, ignore_index=True))
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
