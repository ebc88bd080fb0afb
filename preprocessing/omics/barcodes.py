"""TCGA barcodes: patient IDs, sample types, and the rule that picks one tumour sample per patient.

A TCGA barcode reads ``TCGA-TSS-PPPP-SSV-PPA-PLAT-CC``: project, tissue source site, participant
(the first 12 characters are the patient), then sample type ``SS`` with vial ``V``, portion and
analyte ``PPA``, plate and centre. Omic tables name samples or aliquots; everything downstream is per
patient, so each table is reduced to at most one tumour sample per patient:

1. Normal and control samples (types 10-19, 20-29, 50+ except the tumour-derived 40/60/61) are never
   used as tumour omics.
2. Tumour types are ranked: primary (01, 03, 09) before recurrent (02, 04, 40) before additional
   primary (05) before metastatic (06, 07) before cell/xenograft derived (08, 60, 61); a bare
   12-character patient barcode (sample type unknown) ranks last.
3. Among samples of the same rank, the lowest sample type code, then the lowest vial letter (01A
   before 01B), then the alphabetically first full barcode (portion, analyte, plate) wins.

Picking one sample (rather than averaging) keeps every value a measured one and is reproducible.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from preprocessing.core.errors import InputError

PATIENT_RE = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}$")
BARCODE_RE = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})(?:-(\d{2})([A-Z])?(?:-.*)?)?$")

# sample type code -> rank (lower is preferred); codes not listed are not tumour samples
TUMOUR_RANK: dict[int, int] = {1: 0, 3: 0, 9: 0, 2: 1, 4: 1, 40: 1, 5: 2, 6: 3, 7: 3, 8: 4, 60: 4, 61: 4}
UNKNOWN_TYPE_RANK = 9


@dataclass(frozen=True)
class Barcode:
    """One parsed TCGA barcode: ``sample_type`` is None for a bare patient barcode."""

    text: str
    patient: str
    sample_type: int | None
    vial: str

    @property
    def is_tumour(self) -> bool:
        """True for tumour sample types and for bare patient barcodes (type unknown)."""
        return self.sample_type is None or self.sample_type in TUMOUR_RANK

    @property
    def sort_key(self) -> tuple[int, int, str, str]:
        """Preference order among one patient's samples (smallest first)."""
        rank = UNKNOWN_TYPE_RANK if self.sample_type is None else TUMOUR_RANK.get(self.sample_type, 99)
        return (rank, self.sample_type or 0, self.vial, self.text)


def normalise(text: object) -> str:
    """Upper-case, trimmed, with R-style dots (TCGA.AB.1234.01) turned back into hyphens."""
    return str(text).strip().upper().replace(".", "-")


def parse_barcode(text: object) -> Barcode | None:
    """Parse a TCGA patient, sample or aliquot barcode; None when it is not one."""
    norm = normalise(text)
    match = BARCODE_RE.match(norm)
    if not match:
        return None
    patient, stype, vial = match.groups()
    return Barcode(norm, patient, int(stype) if stype is not None else None, vial or "")


def is_barcode(text: object) -> bool:
    """True when ``text`` parses as a TCGA barcode."""
    return parse_barcode(text) is not None


def patient_of(text: object, source: str | Path = "barcode") -> str:
    """The 12-character patient ID of a barcode; InputError naming ``source`` when it is not one."""
    parsed = parse_barcode(text)
    if parsed is None:
        raise InputError(source, f"not a TCGA barcode: {text!r}")
    return parsed.patient


def slide_patient(stem: str) -> str | None:
    """The patient of a slide file stem (its first 12 characters), or None when they are no barcode."""
    head = normalise(stem[:12])
    return head if PATIENT_RE.match(head) else None


def describe_rows(labels: Iterable[object], limit: int = 5) -> str:
    """A short human list of offending rows/ids for an error message."""
    labels = [str(x) for x in labels]
    shown = ", ".join(labels[:limit])
    return shown + (f" ... ({len(labels)} in all)" if len(labels) > limit else "")


@dataclass
class SampleChoice:
    """The outcome of :func:`choose_samples`: chosen sample per patient and what was left out."""

    chosen: dict[str, str]  # patient -> original sample label
    normals_ignored: list[str]
    duplicates_dropped: list[str]


def choose_samples(labels: Iterable[object], source: str | Path) -> SampleChoice:
    """Pick one tumour sample per patient from sample labels (see the module docstring for the rule).

    Raises InputError naming ``source`` and the labels that are no TCGA barcode.
    """
    labels = list(labels)
    parsed = [(label, parse_barcode(label)) for label in labels]
    bad = [str(label) for label, p in parsed if p is None]
    if bad:
        raise InputError(source, f"sample labels that are not TCGA barcodes: {describe_rows(bad)}")
    by_patient: dict[str, list[tuple[object, Barcode]]] = {}
    normals: list[str] = []
    for label, p in parsed:
        assert p is not None
        if not p.is_tumour:
            normals.append(str(label))
            continue
        by_patient.setdefault(p.patient, []).append((label, p))
    chosen: dict[str, str] = {}
    dropped: list[str] = []
    for patient, items in by_patient.items():
        items.sort(key=lambda item: item[1].sort_key)
        chosen[patient] = str(items[0][0])
        dropped += [str(label) for label, _ in items[1:]]
    return SampleChoice(chosen, normals, dropped)
