"""Opening slides, the MPP chain, level choice and physical patch reading (preprocessing.slides.reader)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
import tifffile
from helpers import raises_one_line_error

from preprocessing.demo.svs_writer import write_svs_from_array
from preprocessing.slides.reader import (
    level_for_mpp,
    open_slide,
    patch_size_level0,
    read_mpp_overrides,
    read_patch,
    read_region_rgb,
    resolve_mpp,
    rgba_to_rgb,
)


def _image(h: int = 640, w: int = 800, seed: int = 0) -> np.ndarray:
    """Light background with a textured pink square in the middle."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 242, np.uint8)
    tex = rng.integers(0, 40, (h // 2, w // 2, 1), dtype=np.uint8)
    img[h // 4:3 * h // 4, w // 4:3 * w // 4] = np.array([220, 130, 180], np.uint8) - tex
    return img


def _props(path: Path) -> dict[str, str]:
    with openslide.OpenSlide(path) as slide:
        return dict(slide.properties)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real SVS files with different metadata: Aperio MPP + AppMag, AppMag only, nothing."""
    root = tmp_path_factory.mktemp("slides")
    img = _image()
    return {
        "aperio": write_svs_from_array(root / "aperio.svs", img, mpp=0.2525, app_mag=40),
        "appmag": write_svs_from_array(root / "appmag.svs", img, mpp=None, app_mag=20),
        "bare": write_svs_from_array(root / "bare.svs", img, mpp=None, app_mag=None),
    }


# ----------------------------------------------------------------------------------------- MPP chain


def test_mpp_from_aperio_metadata_via_openslide(slides: dict[str, Path]) -> None:
    result = resolve_mpp(_props(slides["aperio"]), slides["aperio"])
    assert result.source == "openslide"
    assert result.mpp == pytest.approx(0.2525)
    assert "openslide.mpp-x" in result.detail


def test_cli_mpp_beats_metadata_and_overrides(slides: dict[str, Path]) -> None:
    result = resolve_mpp(_props(slides["aperio"]), slides["aperio"], cli_mpp=0.5,
                         overrides={"aperio": 0.3}, default_mpp=1.0)
    assert (result.source, result.mpp) == ("cli", 0.5)


def test_override_table_beats_metadata_matching_name_or_stem(slides: dict[str, Path], tmp_path: Path) -> None:
    table = tmp_path / "mpp.csv"
    table.write_text("slide,mpp\naperio,0.3\n/some/where/appmag.svs,0.26\n")
    overrides = read_mpp_overrides(table)
    by_stem = resolve_mpp(_props(slides["aperio"]), slides["aperio"], overrides=overrides)
    by_name = resolve_mpp(_props(slides["appmag"]), slides["appmag"], overrides=overrides)
    assert (by_stem.source, by_stem.mpp) == ("overrides", 0.3)
    assert (by_name.source, by_name.mpp) == ("overrides", 0.26)
    # A slide not in the table falls through to its own metadata.
    other = resolve_mpp(_props(slides["bare"]), slides["bare"], overrides=overrides, default_mpp=0.4)
    assert other.source == "default"
    with raises_one_line_error(match="lists both"):
        resolve_mpp({}, "dir/aperio.svs", overrides={"aperio": 0.3, "aperio.svs": 0.5})


def test_vendor_property_used_when_openslide_gives_no_mpp() -> None:
    props = {"aperio.MPP": "0.2520", "aperio.AppMag": "40"}
    assert resolve_mpp(props, "x.svs").source == "vendor"
    assert resolve_mpp(props, "x.svs").mpp == pytest.approx(0.252)
    philips = resolve_mpp({"philips.DICOM_PIXEL_SPACING": '"0.000243" "0.000243"'}, "x.tiff")
    assert (philips.source, philips.mpp) == ("vendor", pytest.approx(0.243))


def test_tiff_resolution_tags_from_a_real_file(tmp_path: Path) -> None:
    # An Aperio-style file without MPP but with a resolution in centimetres: OpenSlide exposes the TIFF
    # tags only, so the chain must convert them itself.
    img = _image(512, 512)
    desc = "Aperio Image Library v12.0.15 \r\n512x512 [0,0 512x512] (256x256) JPEG/RGB Q=80"
    path = tmp_path / "res_cm.svs"
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", compression="jpeg", description=desc,
                     resolution=(40000, 40000), resolutionunit="CENTIMETER", metadata=None)
    props = _props(path)
    assert props["tiff.ResolutionUnit"] == "centimeter" and "openslide.mpp-x" not in props
    result = resolve_mpp(props, path)
    assert (result.source, result.mpp) == ("tiff", pytest.approx(0.25))

    # A generic tiled TIFF in inches: OpenSlide itself turns the tags into openslide.mpp-x/y.
    generic = tmp_path / "generic.tif"
    tifffile.imwrite(generic, img, tile=(256, 256), photometric="rgb", resolution=(101600, 101600),
                     resolutionunit="INCH")
    assert resolve_mpp(_props(generic), generic).mpp == pytest.approx(0.25)

    inch = {"tiff.XResolution": "50800", "tiff.YResolution": "50800", "tiff.ResolutionUnit": "inch"}
    assert resolve_mpp(inch, "x.tif").mpp == pytest.approx(0.5)
    # Unit "none" means the numbers are not physical: skipped, next source (objective power) used.
    no_unit = {"tiff.XResolution": "1", "tiff.ResolutionUnit": "none", "openslide.objective-power": "20"}
    assert resolve_mpp(no_unit, "x.tif").source == "objective"


def test_objective_power_only(slides: dict[str, Path]) -> None:
    props = _props(slides["appmag"])
    assert "openslide.mpp-x" not in props and "aperio.MPP" not in props
    result = resolve_mpp(props, slides["appmag"])
    assert (result.source, result.mpp) == ("objective", pytest.approx(0.5))


def test_no_metadata_uses_default_else_clear_error(slides: dict[str, Path]) -> None:
    props = _props(slides["bare"])
    result = resolve_mpp(props, slides["bare"], default_mpp=0.5)
    assert (result.source, result.mpp) == ("default", 0.5)
    with raises_one_line_error(match="no MPP.*--mpp") as err:
        resolve_mpp(props, slides["bare"])
    assert err.value.source == str(slides["bare"])


@pytest.mark.parametrize(("props", "kwargs"), [
    ({}, {"cli_mpp": 20.0}),
    ({}, {"default_mpp": 0.01}),
    ({"tiff.XResolution": "72", "tiff.YResolution": "72", "tiff.ResolutionUnit": "inch"}, {}),  # 353 um/px
    ({"openslide.mpp-x": "0", "openslide.mpp-y": "0"}, {}),
])
def test_absurd_mpp_is_an_error(props: dict[str, str], kwargs: dict[str, float]) -> None:
    with raises_one_line_error(match="implausible MPP"):
        resolve_mpp(props, "slide.svs", **kwargs)


def test_non_square_pixels_and_garbage_values_are_errors() -> None:
    with raises_one_line_error(match="non-square"):
        resolve_mpp({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.5"}, "s.svs")
    with raises_one_line_error(match="cannot parse aperio.MPP"):
        resolve_mpp({"aperio.MPP": "n/a"}, "s.svs")
    with raises_one_line_error(match="non-square"):
        resolve_mpp({"philips.DICOM_PIXEL_SPACING": '"0.00025" "0.0005"'}, "s.tiff")
    # a placeholder y of 0 is ignored, not averaged into half the pixel size
    placeholder = resolve_mpp({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0"}, "s.svs")
    assert placeholder.mpp == pytest.approx(0.25)


@pytest.mark.parametrize(("text", "message"), [
    ("name,mpp\na,0.25\n", "lacks column"),
    ("slide,mpp\na,fast\n", "line 2: mpp 'fast' is not a number"),
    ("slide,mpp\na.svs,0.25\nold/a.svs,0.5\n", "listed twice"),
    ("slide,mpp\na,-1\n", "positive"),
])
def test_bad_override_table(tmp_path: Path, text: str, message: str) -> None:
    table = tmp_path / "mpp.csv"
    table.write_text(text)
    with raises_one_line_error(match=message) as err:
        read_mpp_overrides(table)
    assert err.value.source == str(table)
    with raises_one_line_error(match="cannot read MPP override table"):
        read_mpp_overrides(tmp_path)  # a folder given by mistake


# ----------------------------------------------------------------------------------- opening slides


def test_unreadable_files_are_input_errors(slides: dict[str, Path], tmp_path: Path) -> None:
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide\n")
    with raises_one_line_error(match="not a slide OpenSlide can read") as err:
        open_slide(text)
    assert err.value.source == str(text)

    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(slides["aperio"].read_bytes()[:4000])
    with raises_one_line_error(match="not a slide OpenSlide can read"):
        open_slide(truncated)

    with raises_one_line_error(match="no such file"):
        open_slide(tmp_path / "missing.svs")


def test_corrupt_tile_data_is_an_input_error_on_read(slides: dict[str, Path], tmp_path: Path) -> None:
    data = bytearray(slides["aperio"].read_bytes())
    with tifffile.TiffFile(slides["aperio"]) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[0], page.databytecounts[0]
    data[offset:offset + count] = bytes(count)
    corrupt = tmp_path / "corrupt.svs"
    corrupt.write_bytes(bytes(data))
    slide = open_slide(corrupt)  # the header is intact
    with raises_one_line_error(match="cannot read level 0") as err:
        read_region_rgb(slide, (0, 0), 0, (64, 64))
    assert str(corrupt) in str(err.value)


# ------------------------------------------------------------------------- levels and physical reads


def test_level_choice_is_closest_not_coarser_than_target() -> None:
    pyramid = (1.0, 4.0, 16.0)
    assert level_for_mpp(pyramid, 0.25, 0.5) == 0       # level 1 is 1.0 um/px: too coarse
    assert level_for_mpp(pyramid, 0.25, 1.0) == 1
    assert level_for_mpp(pyramid, 0.25, 0.99) == 1      # within the 2 % tolerance
    assert level_for_mpp(pyramid, 0.25, 0.97) == 0
    assert level_for_mpp(pyramid, 0.25, 100.0) == 2
    assert level_for_mpp((1.0, 2.0, 4.0), 0.2525, 0.5) == 1  # 0.505 um/px: fine
    assert level_for_mpp(pyramid, 0.5, 0.25) == 0       # finer than the scan: level 0, upsampled
    assert patch_size_level0(256, 0.5, 0.25) == 512
    assert patch_size_level0(256, 0.5, 0.499) == 257


def test_rgba_composited_on_white() -> None:
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, 1] = (100, 0, 0, 255)
    rgba[0, 2] = (0, 0, 0, 128)
    rgb = rgba_to_rgb(rgba)
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[0, 1].tolist() == [100, 0, 0]
    assert rgb[0, 2].tolist() == [127, 127, 127]


def test_read_patch_same_tissue_at_40x_and_20x(tmp_path: Path) -> None:
    img = _image(1280, 1600, seed=1)
    s40 = write_svs_from_array(tmp_path / "s40.svs", img, mpp=0.25, app_mag=40)
    half = cv2.resize(img, (800, 640), interpolation=cv2.INTER_AREA)
    s20 = write_svs_from_array(tmp_path / "s20.svs", half, mpp=0.5, app_mag=20)
    meta40 = {"level": 0, "downsample": 1.0, "patch_size_level0": 512, "patch_size": 256}
    meta20 = {"level": 0, "downsample": 1.0, "patch_size_level0": 256, "patch_size": 256}
    with openslide.OpenSlide(s40) as a, openslide.OpenSlide(s20) as b:
        p40 = read_patch(a, 400, 320, meta40)
        p20 = read_patch(b, 200, 160, meta20)
        assert p40.shape == p20.shape == (256, 256, 3) and p40.dtype == np.uint8
        # Same 128 um square of tissue: mean colours agree and pixels largely agree.
        assert np.abs(p40.astype(int).mean((0, 1)) - p20.astype(int).mean((0, 1))).max() < 3
        assert np.abs(p40.astype(int) - p20.astype(int)).mean() < 8
        # A coarser level, resized: level 1 of the 40x slide is 1 um/px.
        p_l1 = read_patch(a, 0, 0, {"level": 1, "downsample": a.level_downsamples[1],
                                    "patch_size_level0": 512, "patch_size": 64})
        assert p_l1.shape == (64, 64, 3)
        # Beyond the slide edge: white, not black.
        edge = read_patch(a, 1600 - 256, 0, meta40)
        assert (edge[:, 200:] == 255).all()
        with raises_one_line_error(match="downsample"):
            read_patch(a, 0, 0, {**meta40, "level": 1, "downsample": 2.0})


def test_real_slide_mpp(real_slide: Path) -> None:
    path = real_slide
    slide = open_slide(path)
    result = resolve_mpp(dict(slide.properties), path)
    assert (result.source, result.mpp) == ("openslide", pytest.approx(0.499))
    assert level_for_mpp(slide.level_downsamples, result.mpp, 0.5) == 0
