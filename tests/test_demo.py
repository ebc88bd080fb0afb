"""The synthetic demo cohort: names, tables, planted signal, missingness, slides OpenSlide reads."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import cv2
import numpy as np
import openslide
import pandas as pd
import pytest
from helpers import assert_one_line_error, raises_one_line_error, run_healnet
from scipy.stats import spearmanr
from sksurv.metrics import concordance_index_censored

import preprocessing.demo.cohort as demo_module
from healnet.cli import main as healnet_main
from preprocessing.demo.cohort import DemoPlan, generate, plan_cohort, slide_files, write_tables
from preprocessing.demo.omics import CNV_GENES, MUTATION_RATES, OMIC_SIGNAL, RNA_GENES
from preprocessing.demo.render import (
    BACKGROUND,
    MAX_TISSUE,
    MIN_TISSUE,
    layout_map,
    map_tumour_share,
    write_slide,
)

SLIDE_NAME = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})-01Z-00-DX\d\."
                        r"[0-9A-F]{8}-[0-9A-F]{4}-4[0-9A-F]{3}-[0-9A-F]{4}-[0-9A-F]{12}\.svs$")
PATIENT = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}$")


def c_index(truth: pd.DataFrame, column: str) -> float:
    event = truth["OS"].to_numpy().astype(bool)
    return concordance_index_censored(event, truth["OS.time"].to_numpy(float), truth[column].to_numpy())[0]


# ----------------------------------------------------------------------------- plan (no pixels)

@pytest.mark.parametrize("seed", [0, 7])
def test_planted_signal_fusion_beats_each_modality(seed: int) -> None:
    truth = plan_cohort(400, seed).truth
    both = c_index(truth, "true_risk")
    histology, omic = c_index(truth, "histology_risk"), c_index(truth, "omic_risk")
    assert both >= 0.75
    for part in (histology, omic):
        assert 0.55 < part <= both - 0.05
    assert np.allclose(truth["true_risk"], truth["histology_risk"] + truth["omic_risk"] + truth["noise_risk"])
    # Histology risk is a monotone function of the tumour fraction (what the slides show).
    assert spearmanr(truth["tumour_fraction"], truth["histology_risk"]).statistic == pytest.approx(1.0)
    assert 0.5 <= 1 - truth["OS"].mean() <= 0.7


def test_plan_is_cheap_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    plan_cohort(40, 7)  # warm imports
    start = time.perf_counter()
    a = plan_cohort(40, 7)
    assert time.perf_counter() - start < 1.0
    b = plan_cohort(40, 7)
    assert slide_files(a) == slide_files(b)
    pd.testing.assert_frame_equal(a.truth, b.truth)
    write_tables(a, tmp_path / "a")
    write_tables(b, tmp_path / "b")
    files = ["omics/clinical.tsv", "omics/rna.tsv", "omics/cnv.tsv", "omics/mutations.maf",
             "ground_truth.csv"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    c = plan_cohort(40, 8)
    write_tables(c, tmp_path / "c")
    assert not set(slide_files(a)) & set(slide_files(c))
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes(), name


def test_slide_size_and_corrupt_files_change_only_the_slides() -> None:
    base = plan_cohort(30, 5)
    other = plan_cohort(30, 5, long_side_px=4096, corrupt_slides=3)
    pd.testing.assert_frame_equal(base.rna, other.rna)
    pd.testing.assert_frame_equal(base.clinical, other.clinical)
    good = [s.file_name for s in other.slides if not s.corrupt]
    assert good == slide_files(base)
    assert all(max(s.width, s.height) == 4096 for s in other.slides)
    assert all(max(s.width, s.height) == 20000 for s in base.slides)


def test_names_follow_tcga_barcodes() -> None:
    plan = plan_cohort(40, 7, corrupt_slides=2)
    names = slide_files(plan)
    assert len(set(names)) == len(names)
    for name in names:
        m = SLIDE_NAME.match(name)
        assert m, name
        assert m.group(1) in set(plan.truth["patient"])
    assert plan.truth["patient"].map(lambda p: bool(PATIENT.match(p))).all()
    assert plan.truth["patient"].is_unique
    samples = [c for c in plan.rna.columns if c != "gene"]
    assert all(re.match(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}-(01A|01B|11A)$", s) for s in samples)
    assert plan.maf["Tumor_Sample_Barcode"].str.match(
        r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}-01A-11D-[A-Z0-9]{4}-\d\d$").all()
    # Slides of one patient are numbered DX1, DX2, ... without gaps.
    for _, group in pd.Series(names).groupby(pd.Series(names).str[:12]):
        numbers = sorted(int(re.search(r"-DX(\d)\.", n).group(1)) for n in group)
        assert numbers == list(range(1, len(group) + 1))


def test_missingness_mix_and_slide_settings() -> None:
    plan = plan_cohort(40, 7, corrupt_slides=3)
    t = plan.truth.set_index("patient")
    assert (t["n_slides"] == 0).sum() >= 1
    assert (t["n_slides"] == 2).sum() >= 1
    assert (~t["has_omics"]).sum() >= 1
    assert ((t["n_slides"] >= 1) & t["has_omics"]).mean() >= 0.7      # most patients have both
    assert 0.5 <= 1 - t["OS"].mean() <= 0.7
    good = [s for s in plan.slides if not s.corrupt]
    assert {s.magnification for s in good} == {20, 40}
    assert all(s.mpp == (0.25 if s.magnification == 40 else 0.5) for s in plan.slides)
    assert any(s.pen for s in good) and any(not s.pen for s in good)
    assert any(s.pale for s in good) and any(not s.pale for s in good)
    corrupt = [s for s in plan.slides if s.corrupt]
    assert len(corrupt) == 3 and all(t.loc[s.patient, "has_omics"] for s in corrupt)
    assert t["n_corrupt_slides"].sum() == 3
    # Omic tables hold exactly the patients with omics (plus the two extra RNA samples).
    with_omics = set(t.index[t["has_omics"]])
    rna_patients = {c[:12] for c in plan.rna.columns[1:]}
    assert rna_patients == with_omics == {c[:12] for c in plan.cnv.columns[1:]}
    assert set(plan.maf["Tumor_Sample_Barcode"].str[:12]) == with_omics
    extras = [c for c in plan.rna.columns if c.endswith(("-01B", "-11A"))]
    assert sorted(c[-3:] for c in extras) == ["01B", "11A"]
    assert len(plan.clinical) == plan.patients


def test_table_contents_are_plausible() -> None:
    plan = plan_cohort(200, 1)
    assert list(plan.rna["gene"]) == list(RNA_GENES) and len(RNA_GENES) == 200
    assert list(plan.cnv["gene"]) == list(CNV_GENES) and len(CNV_GENES) == 100
    values = plan.rna.iloc[:, 1:].to_numpy()
    assert (values >= 0).all() and np.median(values) > 10 and values.max() > 1000   # raw, not log
    calls = plan.cnv.iloc[:, 1:].to_numpy()
    assert set(np.unique(calls)) <= {-2, -1, 0, 1, 2} and 0.5 < (calls == 0).mean() < 0.95
    maf = plan.maf
    assert set(maf["Hugo_Symbol"]) <= set(MUTATION_RATES) | {"TTN"}
    protein = maf[maf["Variant_Classification"] != "Silent"]
    rate = protein.groupby("Hugo_Symbol")["Tumor_Sample_Barcode"].nunique() / (plan.rna.shape[1] - 3)
    assert 0.3 < rate["TP53"] < 0.6 and rate.drop(["TP53", "TTN", "KRAS"]).max() < 0.3
    for gene in [*OMIC_SIGNAL["rna"], *OMIC_SIGNAL["cnv"]]:
        assert gene in RNA_GENES or gene in CNV_GENES
    clinical = plan.clinical
    assert list(clinical.columns) == ["sample", "_PATIENT", "OS", "OS.time",
                                      "age_at_initial_pathologic_diagnosis", "gender"]
    assert (clinical["OS.time"] > 0).all() and clinical["OS.time"].dtype.kind == "i"
    assert set(clinical["OS"]) == {0, 1} and set(clinical["gender"]) == {"MALE", "FEMALE"}
    assert (clinical["sample"] == clinical["_PATIENT"] + "-01").all()


@pytest.mark.parametrize(("args", "kwargs", "said"), [
    ((2, 0), {}, "patients"),
    ((10, 0), {"long_side_px": 100}, "long-side"),
    ((10, 0), {"corrupt_slides": 50}, "corrupt"),
    ((10, -1), {}, "--seed: -1 is negative"),
])
def test_bad_plans_are_one_line_errors(args: tuple[int, int], kwargs: dict[str, int], said: str) -> None:
    with raises_one_line_error(said):
        plan_cohort(*args, **kwargs)


def test_bad_arguments_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = ["--patients", "6", "--long-side-px", "2048"]
    assert_one_line_error(run_healnet(capsys, "demo", "--out", blocker / "x", *args),
                          "cannot create the cohort folder", command="demo", source=blocker / "x", status=1)
    assert_one_line_error(run_healnet(capsys, "demo", "--out", tmp_path / "x", "--patients", "3"),
                          command="demo", source="--patients", status=1)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- written cohort

@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoPlan]:
    out = tmp_path_factory.mktemp("demo") / "SMALL"
    code = healnet_main(["demo", "--out", str(out), "--patients", "8", "--seed", "3",
                         "--long-side-px", "6144", "--corrupt-slides", "3"])
    assert code == 0
    return out, plan_cohort(8, 3, 6144, 3)


def test_folder_layout_matches_the_plan(cohort: tuple[Path, DemoPlan]) -> None:
    out, plan = cohort
    assert sorted(p.name for p in (out / "slides").iterdir()) == sorted(slide_files(plan))
    assert sorted(p.name for p in (out / "omics").iterdir()) == ["clinical.tsv", "cnv.tsv", "mutations.maf",
                                                                 "rna.tsv"]
    record = json.loads((out / "cohort.json").read_text())
    params = (record["patients"], record["seed"], record["long_side_px"], record["corrupt_slides"])
    assert params == (8, 3, 6144, 3)
    assert record["slide_files"] == slide_files(plan)
    truth = pd.read_csv(out / "ground_truth.csv")
    assert {"patient", "true_risk", "histology_risk", "omic_risk", "tumour_fraction"} <= set(truth.columns)
    assert list(truth["patient"]) == list(plan.truth["patient"])
    rna = pd.read_csv(out / "omics" / "rna.tsv", sep="\t")
    assert rna.columns[0] == "gene" and rna.shape == plan.rna.shape
    np.testing.assert_allclose(rna.iloc[:, 1:].to_numpy(), plan.rna.iloc[:, 1:].to_numpy(), atol=1e-4)
    maf = pd.read_csv(out / "omics" / "mutations.maf", sep="\t")
    assert list(maf.columns) == ["Hugo_Symbol", "Tumor_Sample_Barcode", "Variant_Classification"]
    assert not list(out.glob("**/.*tmp*"))  # no temporary leftovers


def test_slides_open_as_aperio_with_their_scan_settings(cohort: tuple[Path, DemoPlan]) -> None:
    out, plan = cohort
    for spec in plan.slides:
        if spec.corrupt:
            continue
        slide = openslide.OpenSlide(out / "slides" / spec.file_name)
        props = slide.properties
        assert props["openslide.vendor"] == "aperio"
        assert float(props["openslide.mpp-x"]) == pytest.approx(spec.mpp)
        assert float(props["openslide.mpp-y"]) == pytest.approx(spec.mpp)
        assert float(props["openslide.objective-power"]) == spec.magnification
        assert slide.level_count >= 3
        assert slide.dimensions == (spec.width, spec.height) and max(slide.dimensions) == 6144
        slide.close()


def test_corrupt_slides_do_not_open(cohort: tuple[Path, DemoPlan]) -> None:
    out, plan = cohort
    corrupt = [s for s in plan.slides if s.corrupt]
    assert {s.corrupt for s in corrupt} == {"truncated", "garbage", "html"}
    for spec in corrupt:
        path = out / "slides" / spec.file_name
        assert path.stat().st_size > 0
        with pytest.raises(openslide.OpenSlideError):
            openslide.OpenSlide(path)
    assert (out / "slides" / next(s for s in corrupt if s.corrupt == "truncated").file_name
            ).read_bytes()[:4] == b"II*\x00"


def test_slides_look_like_he_tissue_on_glass(cohort: tuple[Path, DemoPlan]) -> None:
    out, plan = cohort
    for spec in plan.slides:
        if spec.corrupt or spec.pen:
            continue
        slide = openslide.OpenSlide(out / "slides" / spec.file_name)
        level = slide.level_count - 1
        image = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB"))
        layout, _ = layout_map(spec)
        alpha = cv2.resize(layout[..., 0], image.shape[1::-1], interpolation=cv2.INTER_AREA)
        glass, tissue = image[alpha < 0.01].astype(float), image[alpha > 0.99].astype(float)
        np.testing.assert_allclose(glass.mean(0), BACKGROUND, atol=3)
        # a section of about the same physical size: a quarter of the slide's area at 20x
        physical = (0.25 / spec.mpp) ** 2
        assert 0.5 * MIN_TISSUE * physical < (alpha > 0.5).mean() < 1.5 * MAX_TISSUE * physical
        r, g, b = tissue.mean(0)
        assert g < r - 30 and g < b - 20   # pink and purple: green absorbed by both stains
        slide.close()


def test_tumour_and_stroma_differ_at_half_micron_per_pixel(cohort: tuple[Path, DemoPlan]) -> None:
    """A 128 um patch (256 px at 0.5 um/px, the extraction setting) of tumour is full of dark nuclei,
    one of stroma is not, at both magnifications."""
    out, plan = cohort
    dark_share: dict[tuple[int, str], float] = {}
    for spec in plan.slides:
        if spec.corrupt:
            continue
        layout, cell = layout_map(spec)
        size = round(256 * 0.5 / spec.mpp)                 # the patch in level-0 pixels
        k = int(np.ceil(size / cell)) + 1
        plain = (layout[..., 0] > 0.999) & (layout[..., 2] < 0.001) & (layout[..., 3] < 0.001)
        for name, pure in {"tumour": layout[..., 1] > 0.999, "stroma": layout[..., 1] < 0.001}.items():
            if (spec.magnification, name) in dark_share:
                continue
            ok = cv2.erode((plain & pure).astype(np.uint8), np.ones((k, k), np.uint8), anchor=(0, 0))
            ys, xs = np.nonzero(ok)
            if not len(xs):
                continue
            i = len(xs) // 2
            with openslide.OpenSlide(out / "slides" / spec.file_name) as slide:
                patch = slide.read_region((int(xs[i] * cell), int(ys[i] * cell)), 0, (size, size))
            rgb = np.asarray(patch.convert("RGB").resize((256, 256))).astype(int)
            dark_share[spec.magnification, name] = float((rgb.sum(-1) < 330).mean())  # dark nuclei
    assert set(dark_share) == {(m, c) for m in (20, 40) for c in ("tumour", "stroma")}
    for mag in (20, 40):
        assert dark_share[mag, "tumour"] > 0.25 and dark_share[mag, "stroma"] < 0.12, dark_share


def test_slide_pixels_follow_the_tumour_fraction(cohort: tuple[Path, DemoPlan]) -> None:
    out, plan = cohort
    planned, measured = [], []
    for spec in plan.slides:
        if spec.corrupt:
            continue
        assert map_tumour_share(layout_map(spec)[0]) == pytest.approx(spec.tumour_fraction, abs=0.01)
        slide = openslide.OpenSlide(out / "slides" / spec.file_name)
        image = np.asarray(slide.read_region((0, 0), 1, slide.level_dimensions[1]).convert("RGB")).astype(int)
        tissue = image.min(-1) < 215
        purple = tissue & (image[..., 2] - image[..., 0] > -5)  # nuclei and tumour cytoplasm
        planned.append(spec.tumour_fraction)
        measured.append(purple.sum() / tissue.sum())
    assert spearmanr(planned, measured).statistic > 0.8


def test_same_spec_gives_identical_slide_bytes(tmp_path: Path) -> None:
    spec = next(s for s in plan_cohort(8, 3, 2048).slides if s.pen)
    digests = [hashlib.sha256(write_slide(spec, tmp_path / f"{k}.svs").read_bytes()).hexdigest()
               for k in range(2)]
    assert digests[0] == digests[1]


def test_rerun_in_same_folder_removes_the_old_cohorts_slides(tmp_path: Path) -> None:
    out = tmp_path / "C"
    first = generate(out, 6, 1, long_side_px=2048, workers=1)
    second = generate(out, 6, 2, long_side_px=2048, workers=1)
    assert sorted(p.name for p in (out / "slides").iterdir()) == sorted(slide_files(second))
    assert not set(slide_files(first)) & set(slide_files(second))

    # a run interrupted while writing its slides (no cohort.json yet) leaves no foreign slide either
    def interrupted(spec: object, path: str) -> None:
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo_module, "_slide_job", interrupted)
        (out / "slides" / slide_files(first)[0]).write_bytes(b"half a slide of seed 1")
        with pytest.raises(KeyboardInterrupt):
            generate(out, 6, 1, long_side_px=2048, workers=1)
    generate(out, 6, 3, long_side_px=2048, workers=1)
    assert sorted(p.name for p in (out / "slides").iterdir()) == sorted(slide_files(plan_cohort(6, 3, 2048)))


def test_real_aperio_slide_reads_like_the_demo_slides(real_slide: Path,
                                                      cohort: tuple[Path, DemoPlan]) -> None:
    real = openslide.OpenSlide(real_slide)
    assert real.properties["openslide.vendor"] == "aperio"
    assert float(real.properties["openslide.mpp-x"]) == pytest.approx(0.499, abs=1e-3)
    assert real.properties["openslide.objective-power"] == "20"
    out, plan = cohort
    ours = openslide.OpenSlide(out / "slides" / next(s.file_name for s in plan.slides if not s.corrupt))
    # The properties downstream code reads exist in both.
    for key in ["openslide.mpp-x", "openslide.objective-power", "aperio.AppMag", "aperio.MPP"]:
        assert key in real.properties and key in ours.properties
