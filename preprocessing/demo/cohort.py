"""``healnet demo``: a synthetic TCGA-like cohort (slides + omic tables) with a planted survival signal.

The cohort is decided by :func:`plan_cohort` without touching pixels (milliseconds, so the Snakefile
can call it at parse time to learn the slide file names), then :func:`generate` writes it::

    DIR/slides/TCGA-XX-XXXX-01Z-00-DX1.<UUID>.svs   pyramidal Aperio SVS (40x or 20x), a few unreadable
    DIR/omics/clinical.tsv                          Xena-like survival table, one row per patient
    DIR/omics/rna.tsv, cnv.tsv                      gene x sample matrices (RSEM-like, GISTIC-like)
    DIR/omics/mutations.maf                         MAF subset (Hugo_Symbol, Tumor_Sample_Barcode, ...)
    DIR/ground_truth.csv                            per patient: true risk and its parts (tests only)
    DIR/cohort.json                                 parameters, file lists, planted signal

Survival signal: ``true_risk = histology_risk + omic_risk + noise_risk``. The histology part comes from
each patient's tumour fraction (share of the tissue that is tumour-like on the slides), the omic part
from a few named genes (:data:`preprocessing.demo.omics.OMIC_SIGNAL`); each part alone ranks patients
clearly worse than both together, so a model that fuses slides and omics can beat either alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import time
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from preprocessing.core.atomic import atomic_output
from preprocessing.core.errors import InputError
from preprocessing.demo.omics import CNV_GENES, OMIC_SIGNAL, RNA_GENES, OmicDraw, draw_omics, survival_times
from preprocessing.demo.render import SlideSpec, write_slide

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
MIN_PATIENTS = 6
MIN_LONG_SIDE = 2048
MAX_LONG_SIDE = 200_000
# Tissue source sites: two-character codes as TCGA uses them (digits or letters).
SITES = ("05", "35", "38", "44", "49", "50", "55", "64", "67", "69", "73", "75", "78", "86", "91", "93",
         "95", "97", "99", "J2", "L4", "L9", "MN", "MP", "NJ", "O1", "S2")
ALNUM = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
# Planted histology effect: log hazard ratio per standard deviation of tumour fraction.
HISTOLOGY_WEIGHT = 2.0
OMIC_WEIGHT = 2.0
NOISE_SD = 0.3
TUMOUR_FRACTION_RANGE = (0.1, 0.9)   # tumour fraction = low + (high - low) * Beta(2, 2)
SHARE_NO_SLIDE = SHARE_NO_OMICS = SHARE_TWO_SLIDES = 0.1
SHARE_40X = 0.6
SHARE_PEN = SHARE_PALE = 0.3
CORRUPT_KINDS = ("truncated", "garbage", "html")
PENDING = ".slides-being-written.json"  # in the cohort folder while a run writes its slides


@dataclass(frozen=True)
class DemoPlan:
    """Every decision about a demo cohort; pixels and files are made from it by :func:`generate`."""

    patients: int
    seed: int
    long_side_px: int
    corrupt_slides: int
    truth: pd.DataFrame        # one row per patient: ids, clinical values, risks, survival, availability
    slides: tuple[SlideSpec, ...]
    rna: pd.DataFrame          # gene x sample (RSEM-like values), first column "gene"
    cnv: pd.DataFrame          # gene x sample (GISTIC calls), first column "gene"
    maf: pd.DataFrame          # Hugo_Symbol, Tumor_Sample_Barcode, Variant_Classification

    @property
    def clinical(self) -> pd.DataFrame:
        """The Xena-like survival table (one row per patient, sorted by sample)."""
        t = self.truth
        return pd.DataFrame({
            "sample": t["patient"] + "-01", "_PATIENT": t["patient"], "OS": t["OS"], "OS.time": t["OS.time"],
            "age_at_initial_pathologic_diagnosis": t["age"], "gender": t["gender"],
        }).sort_values("sample", ignore_index=True)


def slide_files(plan: DemoPlan) -> list[str]:
    """File names (relative to ``DIR/slides``) of every slide of the plan, unreadable ones included."""
    return [s.file_name for s in plan.slides]


def _validate(patients: int, long_side_px: int, corrupt_slides: int, seed: int = 0) -> None:
    if seed < 0:
        raise InputError("--seed", f"{seed} is negative; a seed is a whole number from 0")
    if patients < MIN_PATIENTS:
        raise InputError("--patients", f"{patients} is too few; a demo cohort needs at least {MIN_PATIENTS}")
    if not MIN_LONG_SIDE <= long_side_px <= MAX_LONG_SIDE:
        raise InputError("--long-side-px", f"{long_side_px} is outside {MIN_LONG_SIDE}..{MAX_LONG_SIDE}")
    if corrupt_slides < 0:
        raise InputError("--corrupt-slides", f"{corrupt_slides} is negative")


def _codes(rng: np.random.Generator, n: int, length: int) -> list[str]:
    """``n`` distinct random upper-case alphanumeric codes."""
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        code = "".join(rng.choice(ALNUM, length))
        if code not in seen:
            seen.add(code)
            out.append(code)
    return out


def _pick(rng: np.random.Generator, pool: np.ndarray, share: float) -> np.ndarray:
    """At least one, about ``share`` of ``pool``, chosen at random."""
    k = min(len(pool), max(1, int(round(share * len(pool)))))
    return rng.choice(pool, k, replace=False)


def _uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4)).upper()


def plan_cohort(patients: int, seed: int, long_side_px: int = 20000, corrupt_slides: int = 0) -> DemoPlan:
    """Decide the whole cohort from its arguments (no pixels; a few milliseconds for 40 patients).

    Separate random streams for identities, omics, survival, slides and corrupt files mean that
    ``long_side_px`` and ``corrupt_slides`` change only the slides, not the patients or tables.
    """
    _validate(patients, long_side_px, corrupt_slides, seed)
    n = patients
    streams = np.random.SeedSequence(seed).spawn(6)
    r_ids, r_clin, r_omics, r_surv, r_slides, r_corrupt = (np.random.default_rng(s) for s in streams)

    # Identities and availability.
    site_pool = r_ids.choice(SITES, size=min(len(SITES), max(3, n // 8)), replace=False)
    ids = [f"TCGA-{r_ids.choice(site_pool)}-{code}" for code in _codes(r_ids, n, 4)]
    order = r_ids.permutation(n)
    k = max(1, int(round(SHARE_NO_SLIDE * n)))
    no_slide = set(order[:k].tolist())
    k2 = max(1, int(round(SHARE_NO_OMICS * n)))
    no_omics = set(order[k:k + k2].tolist())
    k3 = max(1, int(round(SHARE_TWO_SLIDES * n)))
    two_slides = set(order[k + k2:k + k2 + k3].tolist())
    with_omics = np.array(sorted(set(range(n)) - no_omics))
    dup_tumour, extra_normal = r_ids.choice(with_omics, 2, replace=False)

    # Clinical values and the planted risk.
    age = np.clip(np.round(r_clin.normal(66, 10, n)), 38, 90).astype(int)
    gender = np.where(r_clin.random(n) < 0.52, "FEMALE", "MALE")
    lo, hi = TUMOUR_FRACTION_RANGE
    tumour_fraction = lo + (hi - lo) * r_clin.beta(2, 2, n)
    tf_sd = (hi - lo) * np.sqrt(1 / 20)                     # sd of the scaled Beta(2, 2)
    histology_risk = HISTOLOGY_WEIGHT * (tumour_fraction - 0.5 * (lo + hi)) / tf_sd
    omics = draw_omics(n, r_omics)
    omic_risk = OMIC_WEIGHT * omics.omic_score
    noise_risk = r_clin.normal(0, NOISE_SD, n)
    true_risk = histology_risk + omic_risk + noise_risk
    os_time, os_event, event_days = survival_times(true_risk, r_surv)

    slides_per_patient = [0 if i in no_slide else 2 if i in two_slides else 1 for i in range(n)]
    specs = _plan_slides(r_slides, ids, slides_per_patient, long_side_px, tumour_fraction)
    n_corrupt = _add_corrupt_slides(r_corrupt, specs, ids, with_omics, corrupt_slides, long_side_px,
                                    tumour_fraction)
    specs.sort(key=lambda s: s.file_name)

    has_omics = np.array([i not in no_omics for i in range(n)])
    good_per_patient = Counter(s.patient for s in specs if not s.corrupt)
    n_good = np.array([good_per_patient[p] for p in ids])
    truth = pd.DataFrame({
        "patient": ids, "true_risk": true_risk, "histology_risk": histology_risk, "omic_risk": omic_risk,
        "noise_risk": noise_risk, "observable_risk": histology_risk + omic_risk,
        "tumour_fraction": tumour_fraction, "omic_score": omics.omic_score,
        "OS": os_event, "OS.time": os_time, "event_days": event_days, "age": age, "gender": gender,
        "n_slides": n_good, "n_corrupt_slides": n_corrupt, "has_omics": has_omics,
        "extra_rna_sample": ["01B" if i == dup_tumour else "11A" if i == extra_normal else ""
                             for i in range(n)],
    })
    rna, cnv, maf = _omic_tables(ids, has_omics, omics, int(dup_tumour), int(extra_normal), r_omics)
    truth = truth.sort_values("patient", ignore_index=True)
    return DemoPlan(patients=n, seed=seed, long_side_px=long_side_px, corrupt_slides=corrupt_slides,
                    truth=truth, slides=tuple(specs), rna=rna, cnv=cnv, maf=maf)


def _plan_slides(rng: np.random.Generator, ids: list[str], slides_per_patient: list[int], long_side_px: int,
                 tumour_fraction: np.ndarray) -> list[SlideSpec]:
    """The readable slides, decided in patient order so each has a stable file name, with their
    scanner setting, pen marks and pale staining."""
    specs: list[SlideSpec] = []
    for i, count in enumerate(slides_per_patient):
        for dx in range(1, count + 1):
            specs.append(_slide_spec(rng, ids[i], dx, long_side_px, float(tumour_fraction[i])))
    n_slides = len(specs)
    # Both scanner settings always occur (40x at 0.25 um/px, 20x at 0.5 um/px).
    n40 = min(n_slides - 1, max(1, int(round(SHARE_40X * n_slides))))
    at40 = set(rng.permutation(n_slides)[:n40].tolist())
    pens = set(_pick(rng, np.arange(n_slides), SHARE_PEN).tolist())
    pales = set(_pick(rng, np.arange(n_slides), SHARE_PALE).tolist())
    inks = rng.choice(["green", "blue", "black"], n_slides)
    return [replace(s, magnification=40 if j in at40 else 20, mpp=0.25 if j in at40 else 0.5,
                    pen=str(inks[j]) if j in pens else None, pale=j in pales)
            for j, s in enumerate(specs)]


def _add_corrupt_slides(rng: np.random.Generator, specs: list[SlideSpec], ids: list[str],
                        with_omics: np.ndarray, corrupt_slides: int, long_side_px: int,
                        tumour_fraction: np.ndarray) -> np.ndarray:
    """Append ``corrupt_slides`` unreadable extra slides, for patients that have omics, to ``specs``;
    returns the number per patient."""
    if corrupt_slides > len(with_omics):
        raise InputError("--corrupt-slides", f"{corrupt_slides} is more than the {len(with_omics)} "
                                             "patients with omics")
    n_corrupt = np.zeros(len(ids), int)
    for j, i in enumerate(rng.choice(with_omics, corrupt_slides, replace=False)):
        have = sum(s.patient == ids[i] for s in specs)   # next DX number
        spec = _slide_spec(rng, ids[i], have + 1, long_side_px, float(tumour_fraction[i]))
        specs.append(replace(spec, corrupt=CORRUPT_KINDS[j % len(CORRUPT_KINDS)]))
        n_corrupt[i] += 1
    return n_corrupt


def _slide_spec(rng: np.random.Generator, patient: str, dx: int, long_side: int,
                tumour_fraction: float) -> SlideSpec:
    short = int(round(long_side * rng.uniform(0.6, 0.8)))
    landscape = rng.random() < 0.75
    return SlideSpec(
        file_name=f"{patient}-01Z-00-DX{dx}.{_uuid(rng)}.svs", patient=patient, dx=dx, magnification=40,
        mpp=0.25, width=long_side if landscape else short, height=short if landscape else long_side,
        seed=int(rng.integers(2**31)), tumour_fraction=tumour_fraction, pen=None, pale=False, corrupt=None)


def _omic_tables(ids: list[str], has_omics: np.ndarray, omics: OmicDraw, dup_tumour: int, extra_normal: int,
                 rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """RNA and CNV matrices (gene rows, sample columns) and the MAF rows of patients with omics."""
    rna_cols: dict[str, np.ndarray] = {}
    cnv_cols: dict[str, np.ndarray] = {}
    maf_rows: list[tuple[str, str, str]] = []
    plates = _codes(rng, max(1, len(ids) // 10 + 1), 4)
    for i in np.flatnonzero(has_omics):
        pid = ids[i]
        rna_cols[f"{pid}-01A"] = omics.rna_log[i]
        cnv_cols[f"{pid}-01A"] = omics.cnv[i]
        if i == dup_tumour:   # a second vial of the same tumour: same biology, technical noise
            rna_cols[f"{pid}-01B"] = omics.rna_log[i] + rng.normal(0, 0.15, len(RNA_GENES))
        if i == extra_normal:  # adjacent normal tissue: no tumour programmes
            normal = omics.rna_log[i] - 0.8 * omics.rna_z[i]
            rna_cols[f"{pid}-11A"] = normal + rng.normal(0, 0.3, len(RNA_GENES))
        aliquot = f"{pid}-01A-11D-{plates[int(i) % len(plates)]}-{'08' if i % 3 else '09'}"
        maf_rows += [(gene, aliquot, variant) for gene, variant in omics.mutations[i]]
    rna = pd.DataFrame({k: np.maximum(np.expm1(v), 0.0) for k, v in sorted(rna_cols.items())})
    rna.insert(0, "gene", list(RNA_GENES))
    cnv = pd.DataFrame(dict(sorted(cnv_cols.items())))
    cnv.insert(0, "gene", list(CNV_GENES))
    columns = ["Hugo_Symbol", "Tumor_Sample_Barcode", "Variant_Classification"]
    maf = pd.DataFrame(maf_rows, columns=columns)
    maf = maf.sort_values(["Tumor_Sample_Barcode", *columns[:1], *columns[2:]], ignore_index=True)
    return rna, cnv, maf


# ----------------------------------------------------------------------------- writing

def _write_tsv(df: pd.DataFrame, path: Path, float_format: str | None = None) -> None:
    with atomic_output(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False, float_format=float_format, lineterminator="\n")


def write_tables(plan: DemoPlan, out_dir: str | Path) -> None:
    """Write the omic tables and the ground truth of ``plan`` (byte-identical for the same plan)."""
    out = Path(out_dir)
    _write_tsv(plan.clinical, out / "omics" / "clinical.tsv")
    _write_tsv(plan.rna, out / "omics" / "rna.tsv", "%.4f")
    _write_tsv(plan.cnv, out / "omics" / "cnv.tsv")
    _write_tsv(plan.maf, out / "omics" / "mutations.maf")
    with atomic_output(out / "ground_truth.csv") as tmp:
        plan.truth.to_csv(tmp, index=False, float_format="%.6f", lineterminator="\n")


def cohort_record(plan: DemoPlan) -> dict:
    """What ``DIR/cohort.json`` holds: parameters, file lists and the planted signal."""
    return {
        "generator_version": GENERATOR_VERSION,
        "patients": plan.patients, "seed": plan.seed, "long_side_px": plan.long_side_px,
        "corrupt_slides": plan.corrupt_slides,
        "slide_files": slide_files(plan),
        "slides": [{k: v for k, v in asdict(s).items() if k != "seed"} for s in plan.slides],
        "omics_files": ["omics/clinical.tsv", "omics/rna.tsv", "omics/cnv.tsv", "omics/mutations.maf"],
        "signal": {"histology_weight_per_sd": HISTOLOGY_WEIGHT, "omic_weight_per_sd": OMIC_WEIGHT,
                   "noise_sd": NOISE_SD, "omic_features": OMIC_SIGNAL},
    }


def _slide_job(spec: SlideSpec, path: str) -> tuple[str, float]:
    import cv2

    cv2.setNumThreads(1)   # parallel over slides, not inside one
    start = time.perf_counter()
    write_slide(spec, path)
    return spec.file_name, time.perf_counter() - start


def generate(out_dir: str | Path, patients: int, seed: int, long_side_px: int = 20000,
             corrupt_slides: int = 0, workers: int = 2) -> DemoPlan:
    """Write the cohort of :func:`plan_cohort` into ``out_dir``; returns the plan.

    Every file is written atomically; ``cohort.json`` is written last, so its presence means the
    cohort is complete. Slides listed by an earlier cohort in the same folder but not by this one
    are removed, so the folder never mixes two cohorts.
    """
    plan = plan_cohort(patients, seed, long_side_px, corrupt_slides)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    record_path = out / "cohort.json"
    # The slides of earlier cohorts written here: those of the finished one (cohort.json) and those
    # an interrupted run was writing (PENDING, written before its first slide and removed after
    # cohort.json), so that an interruption cannot leave a foreign slide behind.
    pending_path = out / PENDING
    stale: set[str] = set()
    for path in (record_path, pending_path):
        try:
            stale |= set(json.loads(path.read_text()).get("slide_files", []))
        except (OSError, ValueError):
            pass
    try:
        (out / "slides").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(out, f"cannot create the cohort folder ({err.strerror or err})") from None
    record_path.unlink(missing_ok=True)
    with atomic_output(pending_path) as tmp:
        tmp.write_text(json.dumps({"slide_files": sorted(stale | set(slide_files(plan)))}) + "\n")
    write_tables(plan, out)
    for name in stale - set(slide_files(plan)):
        (out / "slides" / name).unlink(missing_ok=True)

    start = time.perf_counter()
    jobs = [(spec, str(out / "slides" / spec.file_name)) for spec in plan.slides]
    # Largest first for an even finish; corrupt files are quick.
    jobs.sort(key=lambda j: (j[0].corrupt is None, j[0].width * j[0].height), reverse=True)
    if workers > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
            futures = [pool.submit(_slide_job, spec, path) for spec, path in jobs]
            try:
                for k, fut in enumerate(as_completed(futures), 1):
                    name, seconds = fut.result()
                    log.info("slide %d/%d %s (%.1f s)", k, len(jobs), name, seconds)
            except BaseException:
                pool.shutdown(cancel_futures=True)   # do not render the rest after a failure
                raise
    else:
        for k, (spec, path) in enumerate(jobs, 1):
            name, seconds = _slide_job(spec, path)
            log.info("slide %d/%d %s (%.1f s)", k, len(jobs), name, seconds)
    log.info("%d slides in %.1f s", len(jobs), time.perf_counter() - start)

    with atomic_output(record_path) as tmp:
        tmp.write_text(json.dumps(cohort_record(plan), indent=1) + "\n")
    pending_path.unlink(missing_ok=True)
    return plan


def cli(argv: list[str] | None = None) -> int:
    """``healnet demo --out DIR [--patients N] [--seed S] [--long-side-px PX] [--corrupt-slides K]``."""
    parser = argparse.ArgumentParser(
        prog="healnet demo",
        description="Write a synthetic TCGA-like cohort: pyramidal Aperio slides, clinical, RNA, CNV and "
                    "mutation tables, with a survival signal planted in both the slides and the omics.",
        epilog="Writes DIR/slides/*.svs, DIR/omics/{clinical,rna,cnv}.tsv and mutations.maf, "
               "DIR/ground_truth.csv and, last, DIR/cohort.json.")
    parser.add_argument("--out", required=True, type=Path, help="cohort folder to write")
    parser.add_argument("--patients", type=int, default=40, help="number of patients (default 40)")
    parser.add_argument("--seed", type=int, default=7, help="random seed: same seed, same cohort (default 7)")
    parser.add_argument("--long-side-px", type=int, default=20000,
                        help="level-0 long side of every slide in pixels (default 20000)")
    parser.add_argument("--corrupt-slides", type=int, default=0,
                        help="extra unreadable .svs files, to exercise failure handling (default 0)")
    parser.add_argument("--workers", type=int, default=2, help="slide-writing processes (default 2)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        raise InputError("--workers", f"{args.workers} must be at least 1")
    plan = generate(args.out, args.patients, args.seed, args.long_side_px, args.corrupt_slides, args.workers)
    t = plan.truth
    print(f"{args.out}: {plan.patients} patients, {len(plan.slides)} slide files "
          f"({plan.corrupt_slides} unreadable), {int(t['has_omics'].sum())} with omics, "
          f"{1 - t['OS'].mean():.0%} censored")
    return 0
