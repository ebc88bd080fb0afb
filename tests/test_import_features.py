"""``healnet import-features``: CLAM and TRIDENT .h5 files become feature stores that train exactly
like the stores our own writer makes, and a bad file is a one-line error naming it."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from factory import GRID, Cohort, planted_cohort, train, write_clam, write_config, write_trident
from helpers import assert_one_line_error, raises_one_line_error, run_healnet

from preprocessing.features.import_features import FAILURES, import_features
from preprocessing.features.store import open_store, read_store, store_attrs


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Cohort, Path, Path, Path]:
    """A small planted cohort (stores by our writer), the same features and coords as TRIDENT files
    (float16 features) and as CLAM files (float32), and a config."""
    root = tmp_path_factory.mktemp("import")
    cohort = planted_cohort(root, n_patients=12, n_folds=3, dim=8, patches=(8, 24))
    trident, clam = root / "trident" / "features_stub", root / "clam"
    trident.mkdir(parents=True)
    clam.mkdir()
    for store in sorted(cohort.features_dir.glob("*.zarr")):
        features, coords = read_store(store)
        write_trident(trident / f"{store.stem}.h5", features, coords)
        write_clam(clam / f"{store.stem}.h5", features, coords)
    return cohort, trident, clam, write_config(root / "config.yaml", training={"epochs": 2})


def results(cohort: Cohort, config: Path, out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    assert train(cohort, config, "healnet", out) == 0
    folder = out / "results" / "healnet"
    return pd.read_csv(folder / "folds.csv"), pd.read_parquet(folder / "predictions.parquet")


def test_imported_trident_and_clam_stores_train_exactly_like_our_own(
        planted: tuple[Cohort, Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cohort, trident, clam, config = planted
    ran = run_healnet(capsys, "import-features", "--format", "trident", trident, "-o", tmp_path / "trident")
    assert ran.returncode == 0, ran.stderr
    ran = run_healnet(capsys, "import-features", "--format", "clam", clam, "-o", tmp_path / "clam",
                      "--encoder", "stub", "--dtype", "float16")
    assert ran.returncode == 0, ran.stderr

    ours = sorted(cohort.features_dir.glob("*.zarr"))
    for fmt in ("trident", "clam"):
        for store in ours:
            imported = tmp_path / fmt / store.name
            checked = open_store(imported)
            assert (checked.n, checked.dim, checked.dtype) == (open_store(store).n, 8, np.float16)
            for a, b in zip(read_store(imported), read_store(store), strict=True):
                np.testing.assert_array_equal(a, b)
            attrs = store_attrs(imported)
            source = (trident if fmt == "trident" else clam) / f"{store.stem}.h5"
            assert attrs["source_format"] == fmt and attrs["source_file"] == source.name
            assert attrs["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
            assert attrs["encoder"] == "stub"
            assert attrs["encoder_source"] == ("file" if fmt == "trident" else "--encoder")
            assert attrs["patch_size_level0"] == GRID
            assert attrs["magnification"] == (20 if fmt == "trident" else None)

    expected = results(cohort, config, tmp_path / "ours")
    for fmt in ("trident", "clam"):
        imported = dataclasses.replace(cohort, features_dir=tmp_path / fmt)
        got = results(imported, config, tmp_path / f"run-{fmt}")
        pd.testing.assert_frame_equal(got[0], expected[0])
        pd.testing.assert_frame_equal(got[1], expected[1])


def test_trident_encoder_from_folder_name_and_conflicting_encoder(tmp_path: Path) -> None:
    folder = tmp_path / "features_uni_v1"
    folder.mkdir()
    coords = np.array([[0, 0], [GRID, 0], [0, GRID]])
    write_trident(folder / "S1.h5", np.ones((3, 4), np.float32), coords, encoder=None)
    import_features(folder, tmp_path / "out", "trident")
    attrs = store_attrs(tmp_path / "out" / "S1.zarr")
    assert (attrs["encoder"], attrs["encoder_source"], attrs["dtype"]) == ("uni_v1", "folder name", "float32")
    write_trident(folder / "S1.h5", np.ones((3, 4), np.float32), coords, encoder="conch_v15")
    with raises_one_line_error("conch_v15", "uni_v1", source=folder / "S1.h5"):
        import_features(folder, tmp_path / "out2", "trident", encoder="uni_v1")


def bad_file(kind: str, path: Path) -> Path:
    """A feature file with one defect (``kind``); CLAM layout unless TRIDENT's attributes matter."""
    feats, coords = np.ones((4, 5), np.float32), np.array([[0, 0], [GRID, 0], [0, GRID], [GRID, GRID]])
    if kind == "not_hdf5":
        path.write_text("features,coords\n1,2\n")
        return path
    if kind == "no_features":
        with h5py.File(path, "w") as f:
            f.create_dataset("coords", data=coords)
        return path
    if kind == "patch_size":  # TRIDENT says 512 px at level 0 but neighbours are 256 px apart
        return write_trident(path, feats, coords, patch_size_level0=2 * GRID)
    if kind == "coords_shape":
        coords = np.c_[coords, coords[:, :1]]
    elif kind == "row_count":
        coords = coords[:3]
    elif kind == "nan_features":
        feats[2, 1] = np.nan
    elif kind == "fractional_coords":
        coords = coords + 0.5
        with h5py.File(path, "w") as f:
            f.create_dataset("features", data=feats)
            f.create_dataset("coords", data=coords)
        return path
    return write_clam(path, feats, coords)


@pytest.mark.parametrize(("kind", "fragment"), [
    ("not_hdf5", "not a readable HDF5 file"),
    ("no_features", "no dataset 'features'"),
    ("coords_shape", "coords has shape (4, 3), expected N x 2"),
    ("row_count", "coords has 3 rows but features has 4"),
    ("nan_features", "NaN"),
    ("fractional_coords", "not whole"),
    ("patch_size", "as close as 256 px"),
])
def test_bad_file_is_a_one_line_error_naming_it(kind: str, fragment: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    bad = bad_file(kind, folder / "TCGA-AA-0000-01Z-00-DX1.h5")
    fmt = "trident" if kind == "patch_size" else "clam"
    ran = run_healnet(capsys, "import-features", "--format", fmt, folder, "-o", tmp_path / "out")
    assert_one_line_error(ran, fragment, command="import-features", source=bad)
    assert not (tmp_path / "out" / f"{bad.stem}.zarr").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporaries


def test_good_files_are_written_and_bad_ones_listed(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    coords = np.array([[0, 0], [GRID, 0]])
    for name in ("A", "C"):
        write_clam(folder / f"{name}.h5", np.ones((2, 3)), coords)
    bad = bad_file("row_count", folder / "B.h5")
    ran = run_healnet(capsys, "import-features", "--format", "clam", folder, "-o", out)
    assert_one_line_error(ran, "coords has 3 rows", "the other 2 file(s) were", FAILURES, source=bad)
    assert sorted(p.name for p in out.glob("*.zarr")) == ["A.zarr", "C.zarr"]
    assert all(open_store(p).n == 2 for p in out.glob("*.zarr"))
    listed = pd.read_csv(out / FAILURES, sep="\t")
    assert list(listed["file"]) == [str(bad)]

    bad_file("not_hdf5", folder / "D.h5")
    ran = run_healnet(capsys, "import-features", "--format", "clam", folder, "-o", out)
    assert_one_line_error(ran, "2 of 4 files not imported", "B.h5", source=folder)
    assert len(pd.read_csv(out / FAILURES, sep="\t")) == 2

    for name in ("B", "D"):
        (folder / f"{name}.h5").unlink()
    assert run_healnet(capsys, "import-features", "--format", "clam", folder, "-o", out).returncode == 0
    assert not (out / FAILURES).exists()


def test_slides_give_clams_level0_patch_size_and_bound_the_coords(tmp_path: Path) -> None:
    import openslide

    from preprocessing.demo.svs_writer import write_svs_from_array

    slides, folder = tmp_path / "slides", tmp_path / "in"
    folder.mkdir()
    image = np.full((1024, 1024, 3), 200, np.uint8)
    slide = write_svs_from_array(slides / "S1.svs", image, mpp=0.5, app_mag=20)
    with openslide.OpenSlide(slide) as handle:
        down = handle.level_downsamples[1]
    p0 = round(64 * down)
    coords = np.array([[0, 0], [p0, 0], [0, p0]])
    with h5py.File(folder / "S1.h5", "w") as f:  # CLAM: patch size in pixels of patch_level 1
        f.create_dataset("features", data=np.ones((3, 4), np.float32))
        f.create_dataset("coords", data=coords).attrs.update({"patch_size": 64, "patch_level": 1})
    import_features(folder, tmp_path / "out", "clam", slides_dir=slides)
    attrs = store_attrs(tmp_path / "out" / "S1.zarr")
    assert attrs["patch_size_level0"] == pytest.approx(64 * down)
    assert (attrs["level"], attrs["mpp"]) == (1, 0.5)
    assert attrs["patch_um"] == pytest.approx(64 * down * 0.5)

    with h5py.File(folder / "S1.h5", "r+") as f:
        f["coords"][2] = [0, 1024]
    with raises_one_line_error("outside slide S1.svs", source=folder / "S1.h5"):
        import_features(folder, tmp_path / "out", "clam", slides_dir=slides)
