"""Patient-level cross-validation folds: generated (stratified, seeded) or read from MCAT split files.

The splits table has one row per (fold, patient): ``fold`` (0..K-1), ``patient``, ``role`` ('train'
or 'val'); every manifest patient appears exactly once per fold.

Generated folds: scikit-learn's shuffled ``StratifiedKFold`` on strata = event x time bin (the
cohort's :class:`TimeBins`, used only to balance folds). When a stratum has fewer patients than
folds, the number of time bins is reduced, down to event only; when even an event class has fewer
patients than folds, the folds are still stratified by event (each death in a different fold, as
far as they go); a plain shuffled K-fold only when every patient has the same event status or
both classes are smaller than the number of folds.

Read folds (``splits_{k}.csv``, k = 0..K-1, columns ``train`` and ``val`` of case ids, empty cells
padding the shorter column): a case id not in the manifest, a patient on both sides, or a manifest
patient in neither column is an InputError naming the file and the ids. The last case is an error
rather than a silent exclusion so that published folds are reproduced on exactly their patients:
restrict the inputs to those patients, or drop ``--splits`` to generate folds.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import KFold, StratifiedKFold

from preprocessing.core.errors import InputError
from preprocessing.omics.barcodes import describe_rows, parse_barcode
from preprocessing.omics.labels import TimeBins

log = logging.getLogger(__name__)

SPLIT_FILE_RE = re.compile(r"^splits_(\d+)\.csv$")
ROLES = ("train", "val")


def stratification_labels(
    time: np.ndarray, event: np.ndarray, n_bins: int, n_folds: int
) -> np.ndarray | None:
    """Stratum per patient (event x time bin) with every stratum at least ``n_folds`` strong, or None."""
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event).astype(np.int64)
    for bins in range(max(n_bins, 1), 0, -1):
        tbin = TimeBins(bins).fit_transform(time, event) if bins > 1 else np.zeros(len(time), np.int64)
        strata = event * bins + tbin
        _, counts = np.unique(strata, return_counts=True)
        if counts.min() >= n_folds:
            return strata
    return None


def generate_splits(manifest: pd.DataFrame, n_folds: int = 5, seed: int = 0, n_bins: int = 4) -> pd.DataFrame:
    """Seeded, stratified, patient-level K-fold splits of the manifest's patients."""
    patients = manifest["patient"].to_numpy()
    if len(set(patients)) != len(patients):
        raise ValueError("manifest lists a patient twice")
    if n_folds < 2:
        raise InputError("--n-folds", f"need at least 2 folds, got {n_folds}")
    if len(patients) < n_folds:
        raise InputError("--n-folds", f"{len(patients)} patients cannot be split into {n_folds} folds")
    order = np.argsort(patients, kind="stable")
    patients = patients[order]
    time = manifest["time"].to_numpy()[order]
    event = manifest["event"].to_numpy()[order]
    strata = stratification_labels(time, event, n_bins, n_folds)
    classes = np.unique(event, return_counts=True)[1]
    if strata is None and len(classes) == 2 and classes.max() >= n_folds:  # scikit-learn's requirement
        # fewer deaths (or survivors) than folds: still spread them one per fold, as far as they go,
        # so that as many held-out folds as possible have a death to score
        log.warning("fewer patients in an event class than folds: folds stratified by event only, and "
                    "some held-out folds have no death (their c-index is undefined)")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            folds = list(StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(patients, event))
    elif strata is None:
        log.warning("too few patients per event class to stratify: folds are a plain shuffled K-fold")
        folds = KFold(n_folds, shuffle=True, random_state=seed).split(patients)
    else:
        folds = StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(patients, strata)
    parts = []
    for k, (train_idx, val_idx) in enumerate(folds):
        for role, idx in (("train", train_idx), ("val", val_idx)):
            parts.append(pd.DataFrame({"fold": k, "patient": patients[idx], "role": role}))
    return _tidy(pd.concat(parts, ignore_index=True))


def _tidy(splits: pd.DataFrame) -> pd.DataFrame:
    splits = splits.astype({"fold": np.int64, "patient": str, "role": str})
    splits["_r"] = splits["role"].map({"train": 0, "val": 1})
    splits = splits.sort_values(["fold", "_r", "patient"]).drop(columns="_r").reset_index(drop=True)
    return splits[["fold", "patient", "role"]]


def _case_ids(values: pd.Series, path: Path, column: str) -> list[str]:
    ids = values.dropna().astype(str).str.strip()
    ids = ids[ids != ""]
    parsed = ids.map(parse_barcode)
    bad = ids[parsed.isna()]
    if len(bad):
        raise InputError(path, f"column {column}: not TCGA case ids: {describe_rows(bad)}")
    patients = [p.patient for p in parsed]
    dups = sorted({p for p in patients if patients.count(p) > 1})
    if dups:
        raise InputError(path, f"column {column} lists patient(s) twice: {describe_rows(dups)}")
    return patients


def read_splits(folder: str | Path, patients: Iterable[str]) -> pd.DataFrame:
    """Read ``splits_{k}.csv`` files (MCAT layout) and check them against the manifest's patients."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "splits folder not found")
    numbered = sorted((int(m.group(1)), p) for p in folder.iterdir()
                      if (m := SPLIT_FILE_RE.match(p.name)) and p.is_file())
    files = dict(numbered)
    if len(files) < len(numbered):  # e.g. splits_0.csv and splits_00.csv: which one is fold 0?
        clash = [p.name for k, p in numbered if sum(k == j for j, _ in numbered) > 1]
        raise InputError(folder, f"two split files for the same fold: {', '.join(clash)}")
    if not files:
        raise InputError(folder, "no splits_{k}.csv files")
    if sorted(files) != list(range(len(files))):
        raise InputError(folder, f"split files must be numbered 0..K-1, found {sorted(files)}")
    if len(files) < 2:
        raise InputError(folder, "need at least 2 split files")
    known = set(patients)
    parts = []
    for k in sorted(files):
        path = files[k]
        try:
            # empty cells pad the shorter column; R's write.csv pads with NA
            table = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=["", "NA"])
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise InputError(path, f"cannot parse split file: {err}") from err
        missing = [c for c in ROLES if c not in table.columns]
        if missing:
            raise InputError(path, f"no column(s) {', '.join(missing)} (expected columns train and val)")
        sides = {role: _case_ids(table[role], path, role) for role in ROLES}
        both = sorted(set(sides["train"]) & set(sides["val"]))
        if both:
            raise InputError(path, f"patient(s) on both train and val: {describe_rows(both)}")
        listed = set(sides["train"]) | set(sides["val"])
        unknown = sorted(listed - known)
        if unknown:
            raise InputError(path, f"{len(unknown)} case id(s) not in the manifest (no survival record in "
                                   f"the omics input): {describe_rows(unknown)}")
        absent = sorted(known - listed)
        if absent:
            raise InputError(path, f"{len(absent)} manifest patient(s) in neither train nor val: "
                                   f"{describe_rows(absent)} (restrict the inputs to the split's patients, "
                                   "or leave out --splits to generate folds)")
        for role in ROLES:
            parts.append(pd.DataFrame({"fold": k, "patient": sides[role], "role": role}))
    return _tidy(pd.concat(parts, ignore_index=True))


def check_splits(splits: pd.DataFrame, patients: Iterable[str]) -> None:
    """Raise ValueError unless every patient appears exactly once per fold and roles are train/val."""
    patients = set(patients)
    if not set(splits["role"]) <= set(ROLES):
        raise ValueError(f"unknown roles {set(splits['role']) - set(ROLES)}")
    for fold, part in splits.groupby("fold"):
        if part["patient"].duplicated().any():
            raise ValueError(f"fold {fold}: a patient appears twice")
        if set(part["patient"]) != patients:
            raise ValueError(f"fold {fold}: patients differ from the manifest")
        if not {"train", "val"} <= set(part["role"]):
            raise ValueError(f"fold {fold}: empty train or val side")
