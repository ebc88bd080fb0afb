"""Join per patient: survival labels, slides (matched by the first 12 characters) and omic matrices.

The manifest keeps every patient with survival, also those with neither slides nor omics
(``has_data`` False, logged), so the report can count them; the models decide what to skip.
A slide counts towards ``has_wsi`` only when it is usable: its file is present (``--slides`` /
``--slide-list``) and, when a tiles folder is given, its tiles table exists, has rows and no
``failed`` reason. Unusable slides stay listed in ``failed_slides`` as ``"stem: reason"``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from preprocessing.core.errors import InputError
from preprocessing.omics.barcodes import describe_rows, parse_barcode, slide_patient
from preprocessing.omics.cohort_tables import MODALITIES, CohortTables
from preprocessing.slides.files import SLIDE_SUFFIXES, SlideFolderError, find_slide_files, slide_stem
from preprocessing.tiling.tiles import read_tiles

log = logging.getLogger(__name__)

CLINICAL_COVARIATES = ("age", "is_female")


def list_slide_files(folder: str | Path) -> list[str]:
    """Stems of the slide files in ``folder`` or its subfolders (:mod:`preprocessing.slides.files`)."""
    folder = Path(folder)
    try:
        stems = list(find_slide_files(folder))
    except SlideFolderError as err:
        raise InputError(folder, str(err)) from None
    if not stems:
        raise InputError(folder, f"no slide files ({', '.join(SLIDE_SUFFIXES)})")
    return stems


def read_slide_list(path: str | Path) -> list[str]:
    """Slide stems from a text file: one file name or path per line; blank and '#' lines skipped."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise InputError(path, f"cannot read slide list: {err}") from err
    except UnicodeDecodeError:
        raise InputError(path, "slide list is not a text file (one slide file name per line)") from None
    entries = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if entries and entries[0].lower() in {"slide", "slide_id", "slides", "path"}:
        entries = entries[1:]
    if not entries:
        raise InputError(path, "slide list is empty")
    stems = sorted({slide_stem(Path(e).name) for e in entries})
    return stems


def tiles_status(stems: Iterable[str], tiles_dir: str | Path) -> dict[str, str | None]:
    """Per slide stem: None when ``tiles_dir/{stem}.parquet`` has patches, else the reason it has not."""
    tiles_dir = Path(tiles_dir)
    status: dict[str, str | None] = {}
    for stem in stems:
        path = tiles_dir / f"{stem}.parquet"
        if not path.is_file():
            status[stem] = "no tiles file"
            continue
        try:
            tiles, meta = read_tiles(path)
        except Exception as err:  # noqa: BLE001 - any unreadable file is a failed slide, recorded with why
            status[stem] = f"tiles file unreadable ({type(err).__name__}: {err})"
            continue
        if meta.get("failed"):
            status[stem] = f"failed: {meta['failed']}"
        elif len(tiles) == 0:
            status[stem] = "no tissue patches"
        else:
            status[stem] = None
    return status


def stores_status(stems: Iterable[str], features_dir: str | Path) -> dict[str, str | None]:
    """Per slide stem: None when the feature store ``features_dir/{stem}.zarr`` has patches, else the
    reason it has not (for features made elsewhere and imported, which have no tiles file)."""
    from preprocessing.features.store import open_store, store_attrs

    status: dict[str, str | None] = {}
    for stem in stems:
        path = Path(features_dir) / f"{stem}.zarr"
        try:
            n = open_store(path).n
        except InputError as err:
            status[stem] = "no feature store" if not path.exists() else err.reason
            continue
        if n:
            status[stem] = None
            continue
        failed = store_attrs(path).get("failed")  # only a store without patches records why
        status[stem] = f"failed: {failed}" if failed else "no patches"
    return status


def _slides_by_patient(stems: Sequence[str], source: str) -> dict[str, list[str]]:
    bad = [s for s in stems if slide_patient(s) is None]
    if bad:
        raise InputError(source, f"slide name(s) not starting with a TCGA patient barcode: "
                                 f"{describe_rows(bad)}")
    out: dict[str, list[str]] = {}
    for stem in sorted(stems):
        out.setdefault(str(slide_patient(stem)), []).append(stem)
    return out


def _normal_tissue_slides(stems: Iterable[str]) -> dict[str, str]:
    """Slides whose barcode names a non-tumour sample (normal tissue ``-11A-01-TS1``, controls), with
    why they are not used: the slide branch learns from tumour, as the omics keep tumour samples."""
    out = {}
    for stem in stems:
        barcode = parse_barcode(stem[:16])
        if barcode is not None and not barcode.is_tumour:
            out[stem] = f"not a tumour sample (sample type {barcode.sample_type:02d}): not used"
    return out


def build_manifest(
    tables: CohortTables,
    slide_stems: Sequence[str] | None = None,
    slide_source: str = "slides",
    tiles_dir: str | Path | None = None,
    features_dir: str | Path | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One row per patient with survival: labels, usable slides, modality flags; plus counts for the summary.

    ``slide_stems``: the slides present (None: none given; then the files of the tiles folder, or of
    ``features_dir`` (feature stores) when there are no tiles, are used). A slide is usable when its
    tiles file, or else its feature store, has patches. Returns (manifest sorted by patient, info dict).
    """
    clinical = tables.clinical
    patients = list(clinical.index)
    known = set(patients)
    _check_omics_overlap(tables, patients)
    if slide_stems is None and tiles_dir is not None:
        slide_stems = sorted(p.stem for p in Path(tiles_dir).glob("*.parquet") if not p.name.startswith("."))
        slide_source = str(tiles_dir)
    elif slide_stems is None and features_dir is not None:
        slide_stems = sorted(p.stem for p in Path(features_dir).glob("*.zarr") if not p.name.startswith("."))
        slide_source = str(features_dir)
    info: dict[str, Any] = {"slides_given": slide_stems is not None}
    by_patient: dict[str, list[str]] = {}
    status: dict[str, str | None] = {}
    if slide_stems is not None:
        usable = (tiles_status, tiles_dir) if tiles_dir is not None else (stores_status, features_dir)
        by_patient, status = _match_slides(slide_stems, slide_source, patients, usable, info)
    manifest = _manifest_rows(tables, by_patient, status)
    _count_slides(tables, manifest, by_patient, slide_stems is not None, info)
    info["omic_patients_without_survival"] = {
        m: sorted(set(frame.index) - known) for m, frame in tables.omics.items() if set(frame.index) - known
    }
    for m, missing in info["omic_patients_without_survival"].items():
        log.warning("%s: %d patient(s) with %s data but no survival record are not used", m, len(missing), m)
    no_data = manifest.loc[~manifest["has_data"], "patient"].tolist()
    if no_data:
        log.warning("%d patient(s) have survival but neither slides nor omics (kept, has_data=False): %s",
                    len(no_data), describe_rows(no_data))
    return manifest, info


def _check_omics_overlap(tables: CohortTables, patients: list[str]) -> None:
    """InputError when an omic table shares no patient with the clinical table (a mismatched input)."""
    known = set(patients)
    for modality, frame in tables.omics.items():
        if len(frame) and not known & set(frame.index):
            raise InputError(tables.sources.get(modality, tables.sources.get("table", modality)),
                             f"no patients in common with the clinical table ({len(frame)} patients in "
                             f"{modality}, e.g. {frame.index[0]}; {len(known)} with survival, "
                             f"e.g. {patients[0]})")


def _match_slides(
    slide_stems: Sequence[str], slide_source: str, patients: list[str],
    usable: tuple[Callable[[Iterable[str], Any], dict[str, str | None]], str | Path | None],
    info: dict[str, Any],
) -> tuple[dict[str, list[str]], dict[str, str | None]]:
    """(patient -> slide stems, slide stem -> why it is unusable or None); ``usable``: the status
    function and its folder (tiles or stores; no folder: every slide is usable). Slides of patients
    without survival are logged and listed in ``info``."""
    known = set(patients)
    by_patient = _slides_by_patient(slide_stems, slide_source)
    if by_patient and not known & set(by_patient):
        raise InputError(slide_source, f"no slide belongs to a patient of the clinical table "
                                       f"(e.g. {next(iter(by_patient))}; clinical e.g. {patients[0]})")
    status: dict[str, str | None] = {}
    status_of, folder = usable
    if folder is not None:
        status = status_of([s for p in by_patient if p in known for s in by_patient[p]], folder)
    status.update(_normal_tissue_slides(slide_stems))
    orphans = sorted(s for p, stems in by_patient.items() if p not in known for s in stems)
    if orphans:
        log.warning("%d slide(s) of patients without clinical/survival data ignored: %s", len(orphans),
                    describe_rows(orphans))
    info["slides_without_clinical"] = orphans
    return by_patient, status


def _manifest_rows(tables: CohortTables, by_patient: dict[str, list[str]],
                   status: dict[str, str | None]) -> pd.DataFrame:
    """The manifest: one row per patient of the clinical table, sorted by patient."""
    clinical = tables.clinical
    rows = []
    for patient in clinical.index:
        stems = by_patient.get(patient, [])
        usable = [s for s in stems if status.get(s) is None]
        failed = [f"{s}: {status[s]}" for s in stems if status.get(s) is not None]
        row = {
            "patient": patient,
            "time": float(clinical.at[patient, "time"]),
            "event": int(clinical.at[patient, "event"]),
            "slides": usable,
            "has_wsi": bool(usable),
            **{f"has_{m}": bool(m in tables.omics and patient in tables.omics[m].index) for m in MODALITIES},
            "failed_slides": failed,
            "slide_ids_listed": list(tables.listed_slides.get(patient, [])),
        }
        row["has_omics"] = any(row[f"has_{m}"] for m in MODALITIES)
        row["has_data"] = row["has_wsi"] or row["has_omics"]
        for name in CLINICAL_COVARIATES:
            if name in clinical.columns:
                row[name] = float(clinical.at[patient, name])
        rows.append(row)
    order = ["patient", "time", "event", "slides", "has_wsi", "has_omics", *(f"has_{m}" for m in MODALITIES),
             "has_data", "failed_slides", "slide_ids_listed"]
    manifest = pd.DataFrame(rows)
    manifest = manifest[order + [c for c in manifest.columns if c not in order]]
    manifest["time"] = manifest["time"].astype(np.float64)
    manifest["event"] = manifest["event"].astype(np.int64)
    return manifest.sort_values("patient", ignore_index=True)


def _count_slides(tables: CohortTables, manifest: pd.DataFrame, by_patient: dict[str, list[str]],
                  slides_given: bool, info: dict[str, Any]) -> None:
    """Add the slide counts and the failed slides with their reasons to ``info``."""
    listed = {s for stems in tables.listed_slides.values() for s in stems}
    present = {s for stems in by_patient.values() for s in stems}
    info.update({
        "slides_listed_in_table": len(listed),
        "slides_found": len(present),
        "slides_usable": int(manifest["slides"].map(len).sum()),
        "failed_slides": [
            {"patient": p, "slide": s.split(": ", 1)[0], "reason": s.split(": ", 1)[1]}
            for p, fs in zip(manifest["patient"], manifest["failed_slides"], strict=True)
            for s in fs
        ],
    })
    if slides_given and listed:
        info["slides_listed_but_absent"] = sorted(listed - present)


def build_features(
    tables: CohortTables, manifest: pd.DataFrame, clinical_covariates: Sequence[str] = ()
) -> pd.DataFrame:
    """Patients-with-omics x ``{modality}:{gene}`` float32 matrix (NaN where a modality is missing).

    ``clin:{name}`` columns are added only for the covariates asked for (``age``, ``is_female``).
    """
    clinical_source = tables.sources.get("clinical", tables.sources.get("table", "clinical table"))
    for name in clinical_covariates:
        if name not in CLINICAL_COVARIATES:
            known = ", ".join(CLINICAL_COVARIATES)
            raise InputError("--clinical-covariates", f"unknown covariate {name!r}; known: {known}")
        if name not in tables.clinical.columns or tables.clinical[name].isna().all():
            raise InputError(clinical_source, f"clinical covariate {name!r} asked for but not in the table")
    patients = manifest.loc[manifest["has_omics"], "patient"].tolist()
    index = pd.Index(patients, name="patient")
    blocks = []
    for modality in MODALITIES:
        if modality in tables.omics:
            frame = tables.omics[modality].reindex(index)
            blocks.append(frame.set_axis([f"{modality}:{g}" for g in frame.columns], axis=1))
    for name in clinical_covariates:
        blocks.append(tables.clinical[[name]].reindex(index).set_axis([f"clin:{name}"], axis=1))
    features = pd.concat(blocks, axis=1) if blocks else pd.DataFrame(index=index)
    features.index.name = "patient"
    return features.astype(np.float32)
