"""Read the omics input, clinical and omic tables, into per-patient frames: the step's entry point.

The input is either of two layouts:

- **MCAT layout**: one table with a row per slide and the clinical and omic columns side by side
  (:mod:`preprocessing.omics.mcat`);
- **folder layout**: separate clinical, expression, copy-number and mutation tables as downloaded
  from UCSC Xena, cBioPortal or GDC (:mod:`preprocessing.omics.folder`).

Both give a :class:`~preprocessing.omics.cohort_tables.CohortTables`. Underneath them,
:mod:`preprocessing.omics.files` reads one table file, :mod:`preprocessing.omics.clinical` the
survival and covariates, :mod:`preprocessing.omics.matrices` the omic matrices and MAFs, and
:mod:`preprocessing.omics.barcodes` picks one tumour sample per patient.
"""

from __future__ import annotations

from pathlib import Path

from preprocessing.core.errors import InputError
from preprocessing.omics.cohort_tables import CohortTables
from preprocessing.omics.folder import read_folder
from preprocessing.omics.mcat import read_mcat


def read_omics(path: str | Path, include_silent: bool = False) -> CohortTables:
    """Read the omics input: a folder of separate tables, or one MCAT-style table."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist")
    if path.is_dir():
        return read_folder(path, include_silent=include_silent)
    return read_mcat(path)
