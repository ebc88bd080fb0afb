"""Every slide format users bring, made from the real CMU-1 slide (tests/converters.py): a DICOM WSI
series, an OME-TIFF pyramid, a flat tiled TIFF and a flat TIFF in strips. Each is found in a slides
folder, tiles to the SVS's patch grid at the pixel size read from its own metadata, and embeds to
the SVS's features; each kind of damage is one line naming the slide and the reason."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from converters import dicomize, instances, write_flat_tiff, write_ome_tiff
from helpers import assert_one_line_error, raises_one_line_error, run_healnet

from preprocessing.features.store import read_store, store_attrs
from preprocessing.slides.files import SlideFolderError, find_slide_files
from preprocessing.slides.reader import open_slide
from preprocessing.tiling.tile import tile_slide
from preprocessing.tiling.tiles import read_tiles

#: the geometry of the default encoder's foundation-model peers: 224 px at 0.5 um/px
PATCH, TARGET_MPP = 224, 0.5
#: where each format's pixel size comes from (the MPP chain's source names)
MPP_SOURCE = {"svs": "openslide", "dicom": "dicom", "ome": "ome", "flat": "openslide", "strips": "tiff"}


@pytest.fixture(scope="module")
def made(real_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real slide and its conversions but DICOM (which needs the converter's environment)."""
    root = tmp_path_factory.mktemp("formats")
    return {"svs": real_slide, "ome": write_ome_tiff(real_slide, root / "cmu.ome.tif"),
            "flat": write_flat_tiff(real_slide, root / "cmu_flat.tif"),
            "strips": write_flat_tiff(real_slide, root / "cmu_strips.tif", tiled=False)}


@pytest.fixture(scope="module")
def series(real_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real slide as a DICOM WSI series (skips without the converter)."""
    return dicomize(real_slide, tmp_path_factory.mktemp("dicom") / "CMU-1-dicom")


@pytest.fixture
def slide_of(request: pytest.FixtureRequest, made: dict[str, Path]):
    """The slide of one format (DICOM asks for the converted series only when a test needs it)."""
    return lambda kind: request.getfixturevalue("series") if kind == "dicom" else made[kind]


Embedding = tuple[dict, np.ndarray, np.ndarray]


def embed(capsys: pytest.CaptureFixture[str], slide: Path, folder: Path) -> tuple[Embedding, dict]:
    """``healnet tile`` and ``healnet extract`` (default encoder) of ``slide``: the tiles metadata,
    the features, their coordinates and the store's attributes."""
    tiles, store = folder / "tiles.parquet", folder / "features.zarr"
    for args in (["tile", slide, "-o", tiles, "--patch-size", PATCH, "--target-mpp", TARGET_MPP],
                 ["extract", slide, tiles, "-o", store, "--workers", "0", "--dtype", "float32",
                  "--no-progress"]):
        ran = run_healnet(capsys, *args)
        assert ran.returncode == 0, ran.stderr
    features, coords = read_store(store)
    return (read_tiles(tiles)[1], features, coords), store_attrs(store)


@pytest.fixture(scope="module")
def svs_embedding(made: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Embedding:
    """The SVS's tiles metadata, features and coordinates."""
    from healnet.cli import main

    folder, slide = tmp_path_factory.mktemp("svs"), made["svs"]
    tiles, store = folder / "tiles.parquet", folder / "features.zarr"
    assert main(["tile", str(slide), "-o", str(tiles), "--patch-size", str(PATCH)]) == 0
    assert main(["extract", str(slide), str(tiles), "-o", str(store), "--workers", "0",
                 "--dtype", "float32", "--no-progress"]) == 0
    return (read_tiles(tiles)[1], *read_store(store))


@pytest.mark.parametrize(("kind", "reader"), [("dicom", "openslide"), ("ome", "tiles"), ("flat", "tiles"),
                                              ("strips", "openslide")])
def test_each_format_tiles_to_the_svs_grid_and_embeds_to_its_features(
        kind: str, reader: str, slide_of, svs_embedding: Embedding, capsys,
        tmp_path: Path) -> None:
    """The um/px read from the format's own metadata, the SVS's grid (patch counts within 2 %, or one
    patch on this small slide) and its features (mean cosine >= 0.99 over the shared patches); the
    JPEG tile reader serves the JPEG-tiled TIFFs, the OME pyramid included."""
    svs_meta, svs_features, svs_coords = svs_embedding
    (meta, features, coords), attrs = embed(capsys, slide_of(kind), tmp_path)
    assert meta["mpp_source"] == MPP_SOURCE[kind], meta["mpp_detail"]
    assert math.isclose(meta["mpp"], svs_meta["mpp"], rel_tol=1e-6), meta["mpp_detail"]
    assert meta["patch_size_level0"] == svs_meta["patch_size_level0"]
    assert abs(meta["n_patches"] - svs_meta["n_patches"]) <= max(1, 0.02 * svs_meta["n_patches"])
    shared = {tuple(c): i for i, c in enumerate(svs_coords)}
    pairs = [(shared[tuple(c)], j) for j, c in enumerate(coords) if tuple(c) in shared]
    assert len(pairs) >= len(svs_coords) - 2
    a, b = svs_features[[i for i, _ in pairs]], features[[j for _, j in pairs]]
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.mean() >= 0.99, cosine.round(4)
    assert attrs["reader"]["name"] == reader and attrs["bad_patches"]["count"] == 0, attrs["reader"]


def test_a_slides_folder_finds_dicom_series_beside_files(made: dict[str, Path], series: Path,
                                                         tmp_path: Path) -> None:
    """A DICOM series' folder is one slide named by the folder; ``x.ome.tif`` is named ``x``; a
    folder of ``.dcm`` files straight in the slides folder has no name of its own and is refused."""
    slides = tmp_path / "slides"
    (slides / "uuid-1").mkdir(parents=True)
    (slides / "uuid-1" / "TCGA-AA-0001-01Z-00-DX1.svs").symlink_to(made["svs"])
    (slides / "TCGA-AA-0002-01Z-00-DX1.ome.tif").symlink_to(made["ome"])
    shutil.copytree(series, slides / "TCGA-AA-0003-01Z-00-DX1")
    found = find_slide_files(slides)
    assert sorted(found) == ["TCGA-AA-0001-01Z-00-DX1", "TCGA-AA-0002-01Z-00-DX1", "TCGA-AA-0003-01Z-00-DX1"]
    assert found["TCGA-AA-0003-01Z-00-DX1"].is_dir()
    shutil.copy(next(series.glob("*.dcm")), slides / "stray.dcm")
    with pytest.raises(SlideFolderError, match="DICOM files straight in the slides folder"):
        find_slide_files(slides)


def damaged_series(series: Path, folder: Path, how: str) -> Path:
    """A copy of the series missing one instance (``missing``), its VOLUME instance cut to half
    (``truncated``), or without any VOLUME instance (``no_volume``)."""
    copy = Path(shutil.copytree(series, folder / f"series_{how}"))
    numbered = instances(copy)
    volume = next(path for path, kind in numbered.values() if kind == "VOLUME")
    if how == "missing":
        middle = sorted(numbered)[len(numbered) // 2]
        numbered[middle][0].unlink()
    elif how == "truncated":
        data = volume.read_bytes()
        volume.write_bytes(data[: len(data) // 2])
    else:
        volume.unlink()
    return copy


@pytest.mark.parametrize(("how", "reason"), [
    ("missing", r"instance number\(s\) 2 missing from the series \(numbered 0 to 3\)"),
    ("truncated", "cannot be read to its end"),
    ("no_volume", "no VOLUME instance")])
def test_a_damaged_dicom_series_is_one_line_and_no_tiles(how: str, reason: str, series: Path, capsys,
                                                         tmp_path: Path) -> None:
    broken = damaged_series(series, tmp_path, how)
    out = tmp_path / "tiles.parquet"
    ran = run_healnet(capsys, "tile", broken, "-o", out)
    assert_one_line_error(ran, source=broken)
    assert ran.returncode != 0 and re.search(reason, ran.stderr), ran.stderr
    assert not out.exists() and not list(tmp_path.glob(".*tiles*"))
    recorded = run_healnet(capsys, "tile", broken, "-o", out, "--on-error", "record")
    assert recorded.returncode == 0 and re.search(reason, read_tiles(out)[1]["failed"])


@pytest.mark.parametrize(("unit", "size", "reason"), [
    (None, None, "no MPP: .*OME-XML PhysicalSizeX"),
    ("pixel", 1.0, "PhysicalSizeXUnit 'pixel' is not a length unit"),
    ("furlong", 0.5, "OME-XML .*'furlong': not a value the OME schema allows")])
def test_an_ome_tiff_without_a_usable_pixel_size_is_one_line(unit: str | None, size: float | None,
                                                             reason: str, real_slide: Path,
                                                             tmp_path: Path) -> None:
    slide = write_ome_tiff(real_slide, tmp_path / "bad.ome.tif", size=size, unit=unit)
    with raises_one_line_error(match=reason, source=slide):
        tile_slide(slide)
    with open_slide(slide) as opened:  # the pixels are fine: --mpp is the way out
        assert opened.level_count > 1
    assert tile_slide(slide, mpp=0.499, patch_size=PATCH).meta["mpp_source"] == "cli"
