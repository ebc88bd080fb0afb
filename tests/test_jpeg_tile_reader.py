"""The JPEG tile reader: OpenSlide's patches from raw tiles, each decoded once; OpenSlide where not."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
import skimage.data
import tifffile
import zarr
from factory import SMALL_40X, damage_tile, mean_colour_encoder, small_40x_grid, small_40x_slide
from helpers import raises_one_line_error

from preprocessing.features import patches as patches_module
from preprocessing.features.extract import build_parser, extract_slide
from preprocessing.features.patches import BAD, FELL_BACK, OK, PatchDataset
from preprocessing.slides import jpeg_tiles
from preprocessing.slides.jpeg_tiles import Layout, plan_read, probe

WIDTH, HEIGHT = SMALL_40X
OUT = (224, 224)


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    """A small 40x Aperio slide: H&E-like texture, three levels, edge tiles padded."""
    return small_40x_slide(tmp_path_factory.mktemp("tiles") / "slide.svs")


def _both(slide: Path, coords: np.ndarray, level: int, read_size: int,
          out: tuple[int, int] = OUT) -> tuple[np.ndarray, np.ndarray, PatchDataset]:
    """The patches at ``coords`` through OpenSlide and through the tile reader (and its dataset)."""
    reference = PatchDataset(slide, coords, level, read_size, out, reader="openslide")
    tiles = PatchDataset(slide, coords, level, read_size, out, reader="tiles")
    expected = np.stack([reference.read(i)[0] for i in range(len(coords))]).astype(np.int16)
    read = [tiles.read(i) for i in range(len(coords))]
    assert [status for _, status in read] == [OK] * len(coords)
    return expected, np.stack([rgb for rgb, _ in read]).astype(np.int16), tiles


def test_patches_match_openslide_decoding_each_tile_once(slide):
    ys, xs = np.mgrid[0:HEIGHT - 512:256, 0:WIDTH - 512:256]  # overlapping 512 px patches, tile order
    coords = np.c_[xs.ravel(), ys.ravel()]
    expected, got, dataset = _both(slide, coords, level=0, read_size=512)
    assert dataset.describe_reader() == {"requested": "tiles", "name": "tiles", "page_level": 0,
                                         "dct_scale": 0.5, "decoded_downsample": 2.0}
    assert np.abs(expected - got).mean() <= 1.5
    assert np.abs(expected - got).mean(axis=(1, 2, 3)).max() <= 3
    tiles = dataset._tiles
    assert tiles is not None and tiles.decoded == len({(c, r) for x, y in coords
                                                       for c in range(x // 256, (x + 511) // 256 + 1)
                                                       for r in range(y // 256, (y + 511) // 256 + 1)})


def test_edges_coarser_levels_and_odd_downsamples_match_openslide(slide):
    # partly outside the image (OpenSlide: transparent, composited on white), right and bottom
    edge = np.array([[WIDTH - 200, 0], [0, HEIGHT - 100], [WIDTH - 300, HEIGHT - 300]])
    expected, got, _ = _both(slide, edge, level=0, read_size=512)
    assert (got[0, :, 100:] == 255).all() and (got[1, 60:] == 255).all()
    assert np.abs(expected - got).mean() <= 1.5
    # level 1 (downsample 4) read to a smaller output: served from level 1 at 1/2 DCT scale
    coords = np.array([[0, 0], [640, 384], [1536, 1024]])
    expected, got, dataset = _both(slide, coords, level=1, read_size=64, out=(32, 32))
    assert dataset.describe_reader()["page_level"] == 1 and dataset.describe_reader()["dct_scale"] == 0.5
    assert np.abs(expected - got).mean() <= 1.5
    # level 2 (downsample 15.98): positions between pixels are taken from the nearest one
    with openslide.OpenSlide(str(slide)) as handle:
        assert not float(handle.level_downsamples[2]).is_integer()
    expected, got, _ = _both(slide, np.array([[0, 0], [512, 512], [1024, 768]]), level=2, read_size=16,
                             out=(16, 16))
    assert np.abs(expected - got).mean() <= 1.5


def test_real_aperio_slide_matches_openslide(real_slide):
    """CMU-1: photometric RGB JPEG with shared tables, 240 px tiles, 20x; includes edge patches."""
    layout = probe(real_slide)
    assert isinstance(layout, Layout) and not isinstance(layout.pages[0], str)
    assert layout.pages[0].colour == "RGB" and layout.pages[0].tables is not None
    ys, xs = np.mgrid[0:2967:257, 0:2220:257]
    coords = np.c_[xs.ravel(), ys.ravel()][::3]
    expected, got, dataset = _both(real_slide, coords, level=0, read_size=257)
    assert dataset.describe_reader()["dct_scale"] == 1.0  # 257 px -> 224: no DCT scale keeps 224
    assert np.abs(expected - got).mean() <= 1.5


def test_generic_tiled_jpeg_tiff_is_read_from_its_tiles(tmp_path):
    image = cv2.resize(skimage.data.immunohistochemistry(), (700, 600))
    path = tmp_path / "generic.tif"
    tifffile.imwrite(path, image, tile=(256, 256), compression="jpeg")
    layout = probe(path)
    assert isinstance(layout, Layout) and layout.vendor == "generic-tiff"
    expected, got, _ = _both(path, np.array([[0, 0], [300, 300], [500, 400]]), level=0, read_size=256)
    assert np.abs(expected - got).mean() <= 0.5 and (got[2, 200:] == 255).all()


@pytest.mark.parametrize("compression", ["lzw", None])
def test_slides_without_jpeg_tiles_fall_back_to_openslide(tmp_path, compression):
    image = cv2.resize(skimage.data.immunohistochemistry(), (512, 512))
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, image, tile=(256, 256), compression=compression, photometric="rgb")
    coords = np.array([[0, 0], [256, 256]])
    auto = PatchDataset(path, coords, 0, 256, OUT, reader="auto")
    assert auto.reader == "openslide" and "not JPEG" in auto.describe_reader()["why"]
    expected = PatchDataset(path, coords, 0, 256, OUT, reader="openslide").read(1)
    assert np.array_equal(auto.read(1)[0], expected[0]) and auto.read(1)[1] == OK
    with raises_one_line_error(match=r"plain.tif: cannot read its JPEG tiles \(--reader tiles\)"):
        PatchDataset(path, coords, 0, 256, OUT, reader="tiles")
    assert isinstance(plan_read(Layout(str(path), "generic-tiff", ("LZW",)), 0, 256, OUT), str)
    stripped = tmp_path / "stripped.tif"
    tifffile.imwrite(stripped, image, photometric="rgb")  # not tiled: no reader but OpenSlide's
    assert isinstance(probe(stripped), str)
    text = tmp_path / "notes.txt"
    text.write_text("not a slide")
    assert probe(text).startswith("it cannot be opened (not a slide OpenSlide can read")




def test_damaged_tile_falls_back_to_openslide_then_is_bad(slide, tmp_path, monkeypatch):
    damaged = damage_tile(slide, tmp_path / "damaged.svs", index=9)  # row 1, column 1 of 8 x 6 tiles
    coords = np.array([[0, 0], [256, 256], [1024, 1024]])
    dataset = PatchDataset(damaged, coords, 0, 256, OUT, reader="tiles")
    statuses = [dataset.read(i)[1] for i in range(3)]
    assert statuses == [OK, BAD, OK]  # OpenSlide cannot decode that tile either
    # a tile only this reader fails on: the patch comes from OpenSlide, flagged FELL_BACK
    real_decode = jpeg_tiles.decode_tile

    def flaky(data: bytes, colour: str, denominator: int = 1) -> np.ndarray:
        if len(data) == flaky.size:
            raise jpeg_tiles.TileError("simulated")
        return real_decode(data, colour, denominator)

    with tifffile.TiffFile(slide) as tif:
        flaky.size = int(tif.pages[0].databytecounts[9])  # self-contained tiles: no tables joined
    monkeypatch.setattr(jpeg_tiles, "decode_tile", flaky)
    dataset = PatchDataset(slide, coords, 0, 256, OUT, reader="tiles")
    rgb, status = dataset.read(1)
    assert status == FELL_BACK
    assert np.array_equal(rgb, PatchDataset(slide, coords, 0, 256, OUT, reader="openslide").read(1)[0])


def test_provenance_records_the_reader_and_fallbacks(slide, tmp_path, monkeypatch):
    encoder = mean_colour_encoder()
    tiles = small_40x_grid(tmp_path / "slide.parquet")
    stores = {}
    for reader in ("auto", "openslide"):
        out = tmp_path / f"{reader}.zarr"
        extract_slide(slide, tiles, out, encoder=encoder, workers=0, progress=False, reader=reader)
        stores[reader] = zarr.open_group(str(out), mode="r")
    auto = stores["auto"].attrs["reader"]
    assert (auto["requested"], auto["name"], auto["fallback_patches"]) == ("auto", "tiles", 0)
    assert auto["dct_scale"] < 1  # 512 px read for a 32 px encoder input
    assert stores["openslide"].attrs["reader"] == {"requested": "openslide", "name": "openslide",
                                                   "why": "asked for", "fallback_patches": 0}
    np.testing.assert_allclose(stores["auto"]["features"][:], stores["openslide"]["features"][:], atol=0.02)
    monkeypatch.setattr(patches_module.TileReader, "region", _always_damaged)
    out = tmp_path / "fallback.zarr"
    extract_slide(slide, tiles, out, encoder=encoder, workers=0, progress=False)
    attrs = zarr.open_group(str(out), mode="r").attrs
    assert attrs["reader"]["fallback_patches"] == 6 and attrs["n_patches"] == 6
    assert build_parser().parse_args(["s", "t", "-o", "o"]).reader == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["s", "t", "-o", "o", "--reader", "nvjpeg"])


def _always_damaged(self, x, y, extent, out_side=0):
    raise jpeg_tiles.TileError("simulated")
