"""Tissue mask, physical patch grid, QC picture and the ``healnet tile`` command."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
import tifffile
from helpers import assert_one_line_error, run_healnet
from PIL import Image

from healnet.cli import main
from preprocessing.core.errors import InputError
from preprocessing.demo.svs_writer import write_svs_from_array
from preprocessing.slides.reader import read_patch
from preprocessing.tiling.tile import cli as tile_cli
from preprocessing.tiling.tile import tile_slide
from preprocessing.tiling.tiles import read_tiles
from preprocessing.tissue import box_fractions, tissue_mask

BACKGROUND = (242, 240, 243)
PINK = (225, 140, 185)


def tissue_image(h: int, w: int, seed: int = 0, cover: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """Irregular textured pink tissue on a light background; returns (image, tissue truth mask)."""
    rng = np.random.default_rng(seed)
    field = rng.standard_normal((h // 160 + 2, w // 160 + 2)).astype(np.float32)
    field = cv2.GaussianBlur(field, (0, 0), 1.5)
    level = np.quantile(field, 1 - cover)
    truth = cv2.resize(field, (w, h), interpolation=cv2.INTER_CUBIC) > level
    texture = np.tile(rng.integers(0, 30, (64, 64, 1), dtype=np.uint8), (h // 64 + 1, w // 64 + 1, 1))[:h, :w]
    img = np.where(truth[..., None], np.array(PINK, np.uint8) - texture, np.array(BACKGROUND, np.uint8))
    return np.ascontiguousarray(img, dtype=np.uint8), truth


def _noise_background(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(243, 2, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same synthetic tissue written at 40x (0.25 um/px) and, downsampled 2x, at 20x (0.5 um/px)."""
    root = tmp_path_factory.mktemp("pair")
    img, _ = tissue_image(6400, 8000, seed=0)
    s40 = write_svs_from_array(root / "tissue40.svs", img, mpp=0.25, app_mag=40)
    half = cv2.resize(img, (4000, 3200), interpolation=cv2.INTER_AREA)
    s20 = write_svs_from_array(root / "tissue20.svs", half, mpp=0.5, app_mag=20)
    return s40, s20


# ------------------------------------------------------------------------------------- tissue mask


def test_box_fractions_are_exact_for_fractional_boxes() -> None:
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True
    got = box_fractions(mask, np.array([0.0, 3.5, 4.5, 8.0, -1.0]), np.array([0.0, 1.25, 0.0, 8.0, 0.0]), 2.0)
    # left half, 1.5/2 covered, 0.5/2 covered, empty, half the box off the mask
    assert got == pytest.approx([1.0, 0.75, 0.25, 0.0, 0.5])


def test_mask_finds_tissue_and_ignores_background_noise() -> None:
    img, truth = tissue_image(800, 1000, seed=3)
    small = cv2.resize(img, (125, 100), interpolation=cv2.INTER_AREA)
    mask = tissue_mask(small, mpp=8.0)
    expected = cv2.resize(truth.astype(np.uint8), (125, 100), interpolation=cv2.INTER_AREA).astype(bool)
    agreement = (mask.tissue == expected).mean()
    assert agreement > 0.95
    empty = tissue_mask(_noise_background(100, 125), mpp=8.0)
    assert not empty.tissue.any()


def test_pale_tissue_next_to_dark_tissue_is_kept() -> None:
    """Faint eosin (saturation ~30) beside hematoxylin-rich tissue: Otsu alone would split the two."""
    img = _noise_background(200, 300, seed=1)
    img[30:170, 20:140] = (150, 95, 175)    # dark, saturated tissue
    img[30:170, 160:280] = (238, 212, 226)  # pale pink tissue, saturation about 28
    saturation = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[..., 1]
    assert 20 < np.median(saturation[30:170, 160:280]) < 40
    mask = tissue_mask(img, mpp=8.0)
    assert mask.tissue[40:160, 30:130].all() and mask.tissue[40:160, 170:270].mean() > 0.95
    assert not mask.tissue[:20].any() and not mask.tissue[180:].any()


def test_pen_marks_are_excluded_but_bluish_hematoxylin_is_not() -> None:
    img = np.full((200, 200, 3), BACKGROUND, np.uint8)
    img[20:180, 20:100] = (150, 95, 175)   # hematoxylin-rich tissue (purple)
    img[20:180, 120:135] = (40, 70, 185)   # blue ink
    img[20:180, 150:160] = (60, 160, 90)   # green ink
    img[20:180, 170:180] = (30, 30, 35)    # black ink
    mask = tissue_mask(img, mpp=8.0)
    assert mask.tissue[30:170, 30:90].all()
    assert not mask.tissue[:, 110:].any()
    assert mask.pen[30:170, 125].all() and mask.pen[30:170, 155].all() and mask.pen[30:170, 175].all()


# ---------------------------------------------------------------------------------------- the grid


def test_40x_and_20x_give_the_same_grid_in_micrometres(pair: tuple[Path, Path]) -> None:
    r40 = tile_slide(pair[0], patch_size=64, qc=False)
    r20 = tile_slide(pair[1], patch_size=64, qc=False)
    m40, m20 = r40.meta, r20.meta
    assert (m40["patch_size_level0"], m20["patch_size_level0"]) == (128, 64)
    assert m40["patch_um"] == m20["patch_um"] == pytest.approx(32.0)
    assert (m40["level"], m20["level"]) == (0, 0)
    n40, n20 = len(r40.tiles), len(r20.tiles)
    assert n40 > 500
    assert abs(n40 - n20) / max(n40, n20) <= 0.02
    area40, area20 = n40 * m40["patch_um"] ** 2, n20 * m20["patch_um"] ** 2
    assert abs(area40 - area20) / max(area40, area20) <= 0.02
    assert m40["tissue_area_mm2"] == pytest.approx(m20["tissue_area_mm2"], rel=0.02)
    # The same physical places, not only the same count.
    um40 = set(zip(r40.tiles.x * 0.25, r40.tiles.y * 0.25, strict=True))
    um20 = set(zip(r20.tiles.x * 0.5, r20.tiles.y * 0.5, strict=True))
    assert len(um40 & um20) / len(um40 | um20) > 0.95


def test_kept_patches_hold_tissue_and_read_back(pair: tuple[Path, Path]) -> None:
    result = tile_slide(pair[0], target_mpp=1.0, patch_size=64)
    meta = result.meta
    assert meta["level"] == 1 and meta["patch_size_read"] == 64  # 1 um/px level, no resizing
    assert (result.tiles.tissue_fraction >= 0.5).all() and len(result.tiles) > 50
    assert result.tiles.x.max() + meta["patch_size_level0"] <= meta["width"]
    with openslide.OpenSlide(pair[0]) as slide:
        for x, y in result.tiles[["x", "y"]].to_numpy()[:: max(1, len(result.tiles) // 10)]:
            patch = read_patch(slide, int(x), int(y), meta)
            assert patch.shape == (64, 64, 3)
            saturation = cv2.cvtColor(patch, cv2.COLOR_RGB2HSV)[..., 1]
            assert (saturation > 40).mean() >= 0.4  # at least ~half pink tissue


def test_no_tissue_gives_zero_rows_and_a_warning(tmp_path: Path) -> None:
    path = write_svs_from_array(tmp_path / "blank.svs", _noise_background(2000, 2400), mpp=0.5)
    result = tile_slide(path)
    assert result.tiles.empty
    assert "no tissue" in result.meta["warning"]
    assert result.meta["n_patches"] == 0 and result.meta["tissue_area_mm2"] == 0


def test_slide_smaller_than_one_patch(tmp_path: Path) -> None:
    img, _ = tissue_image(150, 200, cover=0.9)
    path = write_svs_from_array(tmp_path / "tiny.svs", img, mpp=0.5)
    result = tile_slide(path)  # 256 px patches at 0.5 um/px: larger than the slide
    assert result.tiles.empty
    assert "smaller than one patch" in result.meta["warning"]


def test_pen_mark_over_background_yields_no_patches(tmp_path: Path) -> None:
    img = np.full((3000, 3000, 3), BACKGROUND, np.uint8)
    img[200:2800, 200:1300] = PINK
    img[200:2800, 1800:2300] = (40, 70, 185)  # a broad blue pen stroke
    path = write_svs_from_array(tmp_path / "pen.svs", img, mpp=0.5)
    result = tile_slide(path, patch_size=128)
    assert len(result.tiles) > 50
    assert result.tiles.x.max() < 1300 and result.meta["pen_area_mm2"] > 0.2


# ---------------------------------------------------------------------------------------- the CLI


def test_cli_writes_tiles_and_qc_with_spaces_and_non_ascii(pair: tuple[Path, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "slides dir ü"
    folder.mkdir()
    slide = folder / "Probe ß 1.svs"
    slide.write_bytes(pair[1].read_bytes())
    out = tmp_path / "out put é" / "tiles.parquet"
    qc = tmp_path / "out put é" / "qc.png"
    assert main(["tile", str(slide), "-o", str(out), "--qc", str(qc), "--patch-size", "128"]) == 0
    tiles, meta = read_tiles(out)
    assert len(tiles) > 50 and list(tiles.columns) == ["x", "y", "tissue_fraction"]
    assert meta["slide"] == "Probe ß 1" and meta["mpp_source"] == "openslide"
    assert meta["failed"] is None and meta["n_patches"] == len(tiles)
    with Image.open(qc) as picture:
        assert picture.format == "PNG" and picture.width >= 1000
        assert picture.height <= 900  # taller pictures lose their top in the Snakemake report
    assert sorted(p.name for p in out.parent.iterdir()) == ["qc.png", "tiles.parquet"]  # no temp files
    # -o naming a folder: one line, exit 1, and no QC picture without its tiles file
    taken = tmp_path / "taken"
    taken.mkdir()
    ran = run_healnet(capsys, "tile", slide, "-o", taken, "--qc", tmp_path / "q.png")
    assert_one_line_error(ran, "exists and is a folder", command="tile", source=taken, status=1)
    assert not (tmp_path / "q.png").exists() and not any(taken.iterdir())


def test_cli_mpp_flags(pair: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "t.parquet"
    table = tmp_path / "mpp.csv"
    table.write_text("slide,mpp\ntissue20,0.25\n")
    assert main(["tile", str(pair[1]), "-o", str(out), "--mpp-overrides", str(table)]) == 0
    meta = read_tiles(out)[1]
    assert (meta["mpp"], meta["mpp_source"], meta["patch_size_level0"]) == (0.25, "overrides", 512)
    assert main(["tile", str(pair[1]), "-o", str(out), "--mpp-overrides", str(table), "--mpp", "0.5"]) == 0
    assert read_tiles(out)[1]["mpp_source"] == "cli"


def test_cli_unreadable_slide_fails_with_one_line_and_no_output(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "notes.svs"
    bad.write_text("not a slide\n")
    out, qc = tmp_path / "out" / "t.parquet", tmp_path / "out" / "qc.png"
    ran = run_healnet(capsys, "tile", bad, "-o", out, "--qc", qc)
    line = assert_one_line_error(ran, command="tile", status=1)
    assert line == f"healnet tile: error: {bad}: not a slide OpenSlide can read (unsupported format, " \
                   "not an image, or truncated)"
    assert not out.exists() and not qc.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_cli_corrupt_tile_data_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img, _ = tissue_image(600, 800)
    good = write_svs_from_array(tmp_path / "g.svs", img, mpp=0.5)
    data = bytearray(good.read_bytes())
    with tifffile.TiffFile(good) as tif:  # damage the low-resolution level the mask is read from
        page = tif.pages[len(tif.pages) - 1]
        offset, count = page.dataoffsets[0], page.databytecounts[0]
    data[offset:offset + count] = bytes(count)
    corrupt = tmp_path / "damaged.svs"
    corrupt.write_bytes(bytes(data))
    out = tmp_path / "t.parquet"
    ran = run_healnet(capsys, "tile", corrupt, "-o", out)
    assert_one_line_error(ran, "cannot read level 2", command="tile", source=corrupt, status=1)
    assert not out.exists()


def test_cli_record_mode_writes_a_failed_marker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img, _ = tissue_image(600, 800)
    good = write_svs_from_array(tmp_path / "g.svs", img, mpp=0.5)
    corrupt = tmp_path / "corrupt.svs"
    corrupt.write_bytes(good.read_bytes()[:3000])
    out, qc = tmp_path / "t.parquet", tmp_path / "qc.png"
    ran = run_healnet(capsys, "tile", corrupt, "-o", out, "--qc", qc, "--on-error", "record")
    assert ran.returncode == 0  # recorded, not fatal: the error is still its one line
    assert_one_line_error(ran.stderr, command="tile", source=corrupt)
    tiles, meta = read_tiles(out)
    assert tiles.empty and list(tiles.columns) == ["x", "y", "tissue_fraction"]
    assert "not a slide" in meta["failed"] and meta["slide"] == "corrupt"
    with Image.open(qc) as picture:
        assert picture.format == "PNG"
    # A slide with no usable MPP is recorded the same way.
    bare = write_svs_from_array(tmp_path / "bare.svs", img, mpp=None, app_mag=None)
    assert main(["tile", str(bare), "-o", str(out), "--on-error", "record"]) == 0
    assert "no MPP" in read_tiles(out)[1]["failed"]


def test_cli_bad_override_table_fails_even_in_record_mode(pair: tuple[Path, Path], tmp_path: Path) -> None:
    table = tmp_path / "mpp.csv"
    table.write_text("name,value\nx,1\n")
    out = tmp_path / "t.parquet"
    with pytest.raises(InputError) as raised:
        tile_cli([str(pair[1]), "-o", str(out), "--mpp-overrides", str(table), "--on-error", "record"])
    assert_one_line_error(raised, "lacks column")
    assert not out.exists()


def test_real_slide(real_slide: Path, tmp_path: Path) -> None:
    out, qc = tmp_path / "cmu.parquet", tmp_path / "cmu.png"
    assert main(["tile", str(real_slide), "-o", str(out), "--qc", str(qc)]) == 0
    tiles, meta = read_tiles(out)
    assert (meta["mpp"], meta["mpp_source"], meta["level"]) == (pytest.approx(0.499), "openslide", 0)
    # 2220 x 2967 px at 0.499 um/px with 257 px patches: an 8 x 11 grid, tissue on roughly a third of it.
    assert (meta["grid_cols"], meta["grid_rows"]) == (8, 11)
    assert 20 <= len(tiles) <= 45
    assert 0.4 < meta["tissue_area_mm2"] < 0.9
    assert meta["warning"] is None
