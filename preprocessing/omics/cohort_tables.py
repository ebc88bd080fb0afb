"""What the omics readers return: a cohort's clinical and omic tables, per patient.

Both input layouts (:mod:`preprocessing.omics.mcat`, :mod:`preprocessing.omics.folder`) give a
:class:`CohortTables`; :mod:`preprocessing.omics.join` joins it with the slides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

MODALITIES = ("rna", "cnv", "mut")


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


def drop_empty_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Patients whose values are all missing do not have this modality."""
    return frame[frame.notna().any(axis=1)]
