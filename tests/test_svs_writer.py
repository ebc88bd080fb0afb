"""The pyramidal Aperio SVS writer: what OpenSlide reads back, flat-tile reuse, atomic failure."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import openslide
import pytest

from preprocessing.demo import svs_writer
from preprocessing.demo.svs_writer import pyramid_sizes, write_aperio_svs, write_svs_from_array


def gradient(ds: float, x: int, y: int, w: int, h: int) -> np.ndarray:
    """A smooth pattern defined in level-0 coordinates (so every level shows the same picture)."""
    xs = (x + np.arange(w) + 0.5) * ds
    ys = (y + np.arange(h) + 0.5) * ds
    out = np.empty((h, w, 3), np.uint8)
    out[..., 0] = (xs[None, :] / 3000 * 200).astype(np.uint8)
    out[..., 1] = (ys[:, None] / 2000 * 200).astype(np.uint8)
    out[..., 2] = 120
    return out


def test_levels_metadata_and_pixels_read_back(tmp_path: Path) -> None:
    path = write_aperio_svs(tmp_path / "g.svs", 3000, 2000, gradient, mpp=0.25, app_mag=40)
    with openslide.OpenSlide(path) as slide:
        assert slide.properties["openslide.vendor"] == "aperio"
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert slide.properties["openslide.objective-power"] == "40"
        assert slide.level_count >= 3
        assert slide.level_dimensions[:3] == ((3000, 2000), (750, 500), (188, 125))
        assert [round(d) for d in slide.level_downsamples[:3]] == [1, 4, 16]
        for level in range(slide.level_count):
            w, h = slide.level_dimensions[level]
            ds = slide.level_downsamples[level]
            got = np.asarray(slide.read_region((0, 0), level, (w, h)).convert("RGB")).astype(int)
            want = gradient(ds, 0, 0, w, h).astype(int)
            assert np.abs(got - want).mean() < 3, level          # JPEG, so close but not exact
            assert np.abs(got[-5:, -5:] - want[-5:, -5:]).max() < 20  # partial edge tiles included


def test_render_is_asked_for_each_tile_of_each_level_once(tmp_path: Path) -> None:
    calls: list[tuple[float, int, int, int, int]] = []

    def render(ds: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        calls.append((ds, x, y, w, h))
        return np.full((h, w, 3), 200, np.uint8)

    write_aperio_svs(tmp_path / "c.svs", 1000, 600, render)
    for ds, w, h in pyramid_sizes(1000, 600):
        tiles = [c for c in calls if c[0] == ds]
        assert len(tiles) == math.ceil(w / 256) * math.ceil(h / 256)
        assert sum(c[3] * c[4] for c in tiles) == w * h


def test_flat_tiles_are_encoded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    encoded: list[tuple[int, ...]] = []
    real_encode = svs_writer.imagecodecs.jpeg8_encode

    def counting_encode(pixels: np.ndarray, **kwargs: object) -> bytes:
        encoded.append(pixels.shape)
        return real_encode(pixels, **kwargs)

    monkeypatch.setattr(svs_writer.imagecodecs, "jpeg8_encode", counting_encode)
    colour = np.array([243, 243, 241], np.uint8)
    # A renderer may say "flat" with a broadcast view, or return a plain array of one colour.
    path = write_aperio_svs(tmp_path / "big.svs", 20000, 12000,
                            lambda ds, x, y, w, h: np.broadcast_to(colour, (h, w, 3)))
    plain = write_aperio_svs(tmp_path / "plain.svs", 3000, 2000,
                             lambda ds, x, y, w, h: np.full((h, w, 3), colour, np.uint8))
    assert len(encoded) == 2   # once per file, for ~3,900 and ~130 tiles
    for p in (path, plain):
        with openslide.OpenSlide(p) as slide:
            w, h = slide.dimensions
            corner = np.asarray(slide.read_region((w - 10, h - 10), 0, (10, 10)).convert("RGB")).astype(int)
            assert np.abs(corner - colour).max() <= 2


def test_missing_metadata_fields_are_left_out(tmp_path: Path) -> None:
    path = write_aperio_svs(tmp_path / "m.svs", 1024, 1024, gradient, mpp=None, app_mag=None)
    with openslide.OpenSlide(path) as slide:
        assert slide.properties["openslide.vendor"] == "aperio"
        assert "openslide.mpp-x" not in slide.properties
        assert "openslide.objective-power" not in slide.properties


def test_failed_render_leaves_nothing(tmp_path: Path) -> None:
    def bad(ds: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        if x > 0:
            return np.zeros((h, w + 1, 3), np.uint8)
        return np.zeros((h, w, 3), np.uint8)

    with pytest.raises(ValueError, match="render returned"):
        write_aperio_svs(tmp_path / "bad.svs", 1000, 500, bad)
    assert list(tmp_path.iterdir()) == []


def test_array_pyramid_is_area_averaged_and_bytes_are_reproducible(tmp_path: Path) -> None:
    checker = np.zeros((1024, 1536, 3), np.uint8)
    checker[::2, ::2] = checker[1::2, 1::2] = 255
    a = write_svs_from_array(tmp_path / "a.svs", checker, mpp=0.5, app_mag=20)
    b = write_svs_from_array(tmp_path / "b.svs", checker, mpp=0.5, app_mag=20)
    assert a.read_bytes() == b.read_bytes()
    with openslide.OpenSlide(a) as slide:
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        small = np.asarray(slide.read_region((0, 0), 2, slide.level_dimensions[2]).convert("RGB"))
        assert abs(float(small.mean()) - 127.5) < 4 and small.std() < 4
