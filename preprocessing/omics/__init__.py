"""Omic tables: readers, TCGA barcodes, per-patient join, folds and fold-fitted transforms.

``healnet omics`` (``preprocessing.omics.cli``) reads the input (``readers``: ``mcat``, ``folder``,
``clinical``, ``matrices``, ``files``), joins it with the slides (``join``), and writes the manifest,
feature matrix and splits (``splits``); ``healnet train`` fits :class:`OmicTransform`
(``transforms``) and :class:`TimeBins` (``labels``) per fold on the training patients only.
"""

from preprocessing.omics.cohort_tables import CohortTables
from preprocessing.omics.labels import TimeBins, fold_time_bins
from preprocessing.omics.readers import read_omics
from preprocessing.omics.splits import generate_splits, read_splits
from preprocessing.omics.transforms import OmicTransform, fit_fold

__all__ = [
    "CohortTables",
    "OmicTransform",
    "TimeBins",
    "fit_fold",
    "fold_time_bins",
    "generate_splits",
    "read_omics",
    "read_splits",
]
