"""The gpu reader, run with the CPU as its decode device: OpenSlide's patches from tiles decoded in
batches, each once; OpenSlide for damaged tiles; chosen by ``auto`` on CUDA only."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import tifffile
import torch
import zarr
from factory import SMALL_40X, damage_tile, mean_colour_encoder, small_40x_grid, small_40x_slide
from helpers import raises_one_line_error

from preprocessing.core.errors import InputError
from preprocessing.features.extract import build_parser, extract_slide
from preprocessing.features.patches import BAD, FELL_BACK, OK, PatchDataset, make_loader
from preprocessing.slides import gpu_tiles
from preprocessing.slides.gpu_tiles import Grid, schedule_tiles

WIDTH, HEIGHT = SMALL_40X
OUT = (224, 224)


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    """A small 40x Aperio slide (YCbCr JPEG tiles of 256 px, 4:2:0), as the tile reader's tests."""
    return small_40x_slide(tmp_path_factory.mktemp("gpu") / "slide.svs")


def _gpu_read(dataset: PatchDataset, batch_size: int = 8, workers: int = 0) -> tuple[np.ndarray, list[int]]:
    """Every patch of ``dataset`` through its loader, in order: (patches, statuses)."""
    images, statuses, order = [], [], []
    for batch, indices, status in make_loader(dataset, batch_size, workers, pin_memory=False):
        assert batch.dtype == torch.uint8 and batch.shape[1:] == (*dataset.out_size, 3)
        images.append(batch.cpu().numpy())
        statuses += status.tolist()
        order += indices.tolist()
    assert order == list(range(len(dataset)))
    return np.concatenate(images), statuses


def _compare(slide: Path, coords: np.ndarray, level: int, read_size: int, out: tuple[int, int] = OUT,
             **kwargs) -> tuple[np.ndarray, PatchDataset]:
    """Per-patch mean absolute difference of the gpu reader's patches to OpenSlide's (all OK)."""
    reference = PatchDataset(slide, coords, level, read_size, out, reader="openslide")
    expected = np.stack([reference.read(i)[0] for i in range(len(coords))]).astype(np.int16)
    dataset = PatchDataset(slide, coords, level, read_size, out, reader="gpu", device="cpu")
    got, statuses = _gpu_read(dataset, **kwargs)
    assert statuses == [OK] * len(coords)
    return np.abs(expected - got.astype(np.int16)).mean(axis=(1, 2, 3)), dataset


def _tiles_needed(coords: np.ndarray, side: int, tile: int) -> int:
    return len({(c, r) for x, y in coords for c in range(x // tile, (x + side - 1) // tile + 1)
                for r in range(y // tile, (y + side - 1) // tile + 1)})


def test_patches_match_openslide_decoding_each_tile_once(slide):
    ys, xs = np.mgrid[0:HEIGHT - 512:256, 0:WIDTH - 512:256]  # overlapping 512 px patches, tile order
    coords = np.c_[xs.ravel(), ys.ravel()]
    diff, dataset = _compare(slide, coords, level=0, read_size=512)
    assert dataset.reader == "gpu"
    assert dataset.describe_reader() == {"requested": "gpu", "name": "gpu", "page_level": 0, "dct_scale": 1.0,
                                         "decoded_downsample": 1.0, "decode_device": "cpu"}
    assert diff.mean() <= 1.5 and diff.max() <= 3
    assert dataset._gpu is not None and dataset._gpu.decoder.decoded == _tiles_needed(coords, 512, 256)


def test_a_small_tile_cache_ships_evicted_tiles_again(slide):
    coords = np.c_[np.tile(np.arange(0, 1400, 200), 3), np.repeat([0, 400, 800], 7)]
    dataset = PatchDataset(slide, coords, 0, 512, OUT, reader="gpu", device="cpu")
    assert dataset._gpu is not None
    grid = dataset._gpu.grid
    batches = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18, 19, 20]]
    plan = schedule_tiles(grid, coords, batches, capacity=4)
    shipped = [t for ship in plan.ship for t in ship]
    assert len(shipped) > len(set(shipped))  # re-sent after eviction
    held: set[int] = set()
    for b, batch in enumerate(batches):  # every tile a batch needs is held while it is assembled
        held |= set(plan.ship[b])
        assert {t for i in batch for t in grid.tiles(*coords[i])} <= held
        held -= set(plan.drop[b])
    assert not held  # each tile released after its last batch
    dataset._gpu.capacity = 4
    got, statuses = _gpu_read(dataset, batch_size=4)
    reference = PatchDataset(slide, coords, 0, 512, OUT, reader="openslide")
    expected = np.stack([reference.read(i)[0] for i in range(len(coords))])
    assert statuses == [OK] * len(coords)
    assert np.abs(expected.astype(np.int16) - got).mean() <= 1.5
    assert dataset._gpu.decoder.decoded > _tiles_needed(coords, 512, 256)


def test_edges_coarser_levels_enlarging_and_reader_processes(slide):
    edge = np.array([[WIDTH - 200, 0], [0, HEIGHT - 100], [WIDTH - 300, HEIGHT - 300]])
    diff, _ = _compare(slide, edge, level=0, read_size=512)
    assert diff.mean() <= 1.5
    coords = np.array([[0, 0], [640, 384], [1536, 1024]])
    diff, dataset = _compare(slide, coords, level=1, read_size=64, out=(32, 32))
    assert dataset.describe_reader()["page_level"] == 1 and diff.mean() <= 1.5
    diff, _ = _compare(slide, coords, level=1, read_size=64, out=(96, 96))  # enlarged: bicubic
    assert diff.mean() <= 1.5
    diff, _ = _compare(slide, np.array([[0, 0], [512, 512], [1024, 768]]), level=2, read_size=16,
                       out=(16, 16))
    assert diff.mean() <= 1.5
    ys, xs = np.mgrid[0:HEIGHT - 256:256, 0:WIDTH - 256:512]
    diff, _ = _compare(slide, np.c_[xs.ravel(), ys.ravel()], level=0, read_size=256, batch_size=4,
                       workers=1)
    assert diff.mean() <= 1.5


def test_real_aperio_rgb_slide_matches_openslide(real_slide):
    """CMU-1: photometric RGB JPEG without colour markers, shared tables, 240 px tiles."""
    ys, xs = np.mgrid[0:2967:257, 0:2220:257]
    coords = np.c_[xs.ravel(), ys.ravel()][::3]
    diff, dataset = _compare(real_slide, coords, level=0, read_size=257, batch_size=16)
    assert dataset._gpu is not None and dataset._gpu.decoder.mode is not None
    assert diff.mean() <= 1.5


def test_ycbcr_tiff_matches_openslide(tmp_path):
    image = cv2.resize(skimage.data.immunohistochemistry(), (700, 600))
    path = tmp_path / "ycbcr.tif"
    tifffile.imwrite(path, image, tile=(256, 256), compression="jpeg")
    with tifffile.TiffFile(path) as tif:
        assert int(tif.pages[0].photometric) == 6  # YCbCr, chroma subsampled
    diff, _ = _compare(path, np.array([[0, 0], [300, 300], [500, 400]]), level=0, read_size=256)
    assert diff.mean() <= 1.5


def test_rgb_tiles_decoded_as_ycbcr_are_caught_by_the_colour_check(real_slide, monkeypatch):
    monkeypatch.setattr(gpu_tiles, "ADOBE_NO_TRANSFORM", b"")  # libjpeg then converts RGB as YCbCr
    coords = np.array([[0, 0], [240, 0]])
    dataset = PatchDataset(real_slide, coords, 0, 240, OUT, reader="gpu", device="cpu")
    got, statuses = _gpu_read(dataset)
    assert statuses == [FELL_BACK, FELL_BACK]
    assert "colours differ" in dataset.describe_reader()["decoder_problem"]
    reference = PatchDataset(real_slide, coords, 0, 240, OUT, reader="openslide")
    assert np.array_equal(got[1], reference.read(1)[0])




def test_damaged_tile_falls_back_to_openslide_then_is_bad(slide, tmp_path, monkeypatch):
    damaged = damage_tile(slide, tmp_path / "damaged.svs", index=9)  # row 1, column 1 of 8 x 6 tiles
    coords = np.array([[0, 0], [256, 256], [1024, 1024]])
    _, statuses = _gpu_read(PatchDataset(damaged, coords, 0, 256, OUT, reader="gpu", device="cpu"))
    assert statuses == [OK, BAD, OK]  # OpenSlide cannot decode that tile either
    with tifffile.TiffFile(slide) as tif:
        assert int(tif.pages[0].photometric) == 6  # YCbCr: streams go to the decoder unchanged
        size = int(tif.pages[0].databytecounts[9])
    real_decode = gpu_tiles.decode_jpeg

    def flaky(data, mode, device):  # a tile only the device decoder fails on (no tables joined, YCbCr)
        sizes = [len(d) for d in data] if isinstance(data, list) else [len(data)]
        if size in sizes:
            raise RuntimeError("simulated")
        return real_decode(data, mode=mode, device=device)

    monkeypatch.setattr(gpu_tiles, "decode_jpeg", flaky)
    dataset = PatchDataset(slide, coords, 0, 256, OUT, reader="gpu", device="cpu")
    got, statuses = _gpu_read(dataset)
    assert statuses == [OK, FELL_BACK, OK]
    reference = PatchDataset(slide, coords, 0, 256, OUT, reader="openslide")
    assert np.array_equal(got[1], reference.read(1)[0])


def test_provenance_cli_and_auto(slide, tmp_path):
    encoder = mean_colour_encoder()
    tiles = small_40x_grid(tmp_path / "slide.parquet")
    stores = {}
    for reader in ("gpu", "openslide"):
        out = tmp_path / f"{reader}.zarr"
        extract_slide(slide, tiles, out, encoder=encoder, workers=0, progress=False, reader=reader,
                      device="cpu", batch_size=4)
        stores[reader] = zarr.open_group(str(out), mode="r")
    attrs = stores["gpu"].attrs["reader"]
    assert (attrs["requested"], attrs["name"], attrs["decode_device"], attrs["fallback_patches"]) == (
        "gpu", "gpu", "cpu", 0)
    np.testing.assert_allclose(stores["gpu"]["features"][:], stores["openslide"]["features"][:], atol=0.02)
    assert build_parser().parse_args(["s", "t", "-o", "o", "--reader", "gpu"]).reader == "gpu"
    coords = np.array([[0, 0]])
    assert PatchDataset(slide, coords, 0, 512, OUT, reader="auto", device="cpu").reader == "tiles"
    assert PatchDataset(slide, coords, 0, 512, OUT).reader == "tiles"
    # until the gpu path has been measured on a GPU, auto keeps the CPU tile reader there too
    assert PatchDataset(slide, coords, 0, 512, OUT, reader="auto", device="cuda").reader == "tiles"


def test_gpu_reader_insists_on_jpeg_tiles(tmp_path):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, cv2.resize(skimage.data.immunohistochemistry(), (512, 512)), tile=(256, 256),
                     compression="lzw", photometric="rgb")
    with raises_one_line_error(match=r"plain.tif: cannot read its JPEG tiles \(--reader gpu\)"):
        PatchDataset(path, np.array([[0, 0]]), 0, 256, OUT, reader="gpu", device="cpu")
    assert PatchDataset(path, np.array([[0, 0]]), 0, 256, OUT, reader="auto", device="cuda").reader == \
        "openslide"
    with pytest.raises(InputError, match="gpu does not apply stain normalisation"):
        extract_slide(path, tmp_path / "t.parquet", tmp_path / "o.zarr", reader="gpu", stain_norm="macenko",
                      stain_reference=tmp_path / "ref.png")


def test_grid_matches_the_cpu_tile_readers_geometry():
    grid = Grid(scale=2.0, side=100, tile_width=64, tile_height=64, width=300, height=200, columns=5)
    assert grid.box(500, 300) == (250, 150, 300, 200)
    assert grid.tiles(500, 300) == [2 * 5 + 3, 2 * 5 + 4, 3 * 5 + 3, 3 * 5 + 4]
    assert grid.tiles(700, 0) == []  # wholly outside the image
