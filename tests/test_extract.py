"""`healnet extract`: the Zarr store a training step reads, written completely or not at all."""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import dask.array as da
import numpy as np
import openslide
import pandas as pd
import pytest
import skimage.data
import torch
import zarr
from factory import damage_tile
from helpers import assert_one_line_error, raises_one_line_error, run_healnet
from torch import nn

from healnet.cli import main as healnet_main
from preprocessing.core.workers import resolve_workers
from preprocessing.demo.svs_writer import write_svs_from_array
from preprocessing.features.encoder_file import save_frozen_encoder
from preprocessing.features.encoders import Encoder, build_encoder
from preprocessing.features.extract import _embed_patches, cli, extract_slide
from preprocessing.features.patch_transforms import Normalise, resize_patch, rgba_to_rgb
from preprocessing.features.patches import PatchDataset, batch_indices
from preprocessing.features.runner import FeatureRunner
from preprocessing.features.store import (
    RowWriter,
    is_complete,
    open_store,
    read_store,
    store_attrs,
    write_store,
)
from preprocessing.features.weights import sha256_file
from preprocessing.tiling.tiles import read_tiles, write_tiles

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT, PATCH = 2048, 1024, 256  # 8 x 4 patches, each exactly one JPEG tile of the SVS
META = {"slide": "slide.svs", "level": 0, "downsample": 1.0, "patch_size_level0": PATCH, "patch_size": PATCH,
        "target_mpp": 0.5, "mpp": 0.5, "mpp_source": "aperio"}


def _grid() -> pd.DataFrame:
    ys, xs = np.mgrid[0:HEIGHT:PATCH, 0:WIDTH:PATCH]
    return pd.DataFrame({"x": xs.ravel(), "y": ys.ravel(), "tissue_fraction": 1.0})


def _load(store: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """A store checked and read as training does: (features, coords, attributes)."""
    open_store(store)
    features, coords = read_store(store)
    return features, coords, store_attrs(store)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A small H&E-like slide (every patch different), its tiles, and a reference store."""
    root = tmp_path_factory.mktemp("extract")
    image = cv2.resize(skimage.data.immunohistochemistry(), (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)
    slide = write_svs_from_array(root / "slide.svs", image, mpp=0.5, app_mag=20)
    tiles = write_tiles(root / "slide.parquet", _grid(), META)
    store = root / "reference.zarr"
    extract_slide(slide, tiles, store, batch_size=5, workers=1, progress=False)
    return {"root": root, "slide": slide, "tiles": tiles, "store": store}


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return build_encoder("efficientnet_lite0")


def test_store_holds_features_coords_and_provenance(data):
    group = zarr.open_group(str(data["store"]), mode="r")
    features, coords = group["features"], group["coords"]
    assert features.shape == (32, 1280) and features.dtype == np.float16
    assert features.chunks == (32, 1280)
    assert coords.dtype == np.int64
    assert np.array_equal(coords[:], _grid()[["x", "y"]].to_numpy())
    attrs = dict(group.attrs)
    assert attrs["complete"] is True and attrs["n_patches"] == attrs["n_tiles"] == 32
    assert attrs["encoder"] == "efficientnet_lite0" and attrs["feature_dim"] == 1280
    assert attrs["weights"].startswith("package:") and len(attrs["weights_sha256"]) == 64
    assert {k: attrs[k] for k in META if k != "slide"} == {k: v for k, v in META.items() if k != "slide"}
    assert attrs["slide"] == "slide.svs" and attrs["slide_bytes"] == data["slide"].stat().st_size
    assert set(attrs["versions"]) >= {"torch", "timm", "zarr", "openslide"}
    assert attrs["bad_patches"] == {"count": 0, "locations": []}
    assert attrs["stain_norm"] is None and attrs["dtype"] == "float16" and attrs["created"]
    # the same numbers through every reader the training step might use
    loaded, loaded_coords, loaded_attrs = _load(data["store"])
    assert np.array_equal(loaded, features[:]) and np.array_equal(loaded_coords, coords[:])
    assert loaded_attrs == attrs
    assert np.array_equal(da.from_zarr(str(data["store"]), component="features").compute(), loaded)
    assert np.isfinite(loaded).all() and loaded.std() > 0
    assert not list(data["root"].glob(".reference.zarr.tmp-*"))


def test_each_row_is_the_embedding_of_its_own_patch(data, encoder):
    features, coords, _ = _load(data["store"])
    with openslide.OpenSlide(str(data["slide"])) as slide:
        patches = [rgba_to_rgb(np.asarray(slide.read_region((int(x), int(y)), 0, (PATCH, PATCH))))
                   for x, y in coords[[0, 13, 31]]]
    batch = torch.from_numpy(np.stack([resize_patch(p, encoder.input_size, encoder.interpolation)
                                       for p in patches]))
    with torch.inference_mode():
        expected = encoder.model(Normalise(encoder.mean, encoder.std)(batch)).numpy()
    np.testing.assert_allclose(features[[0, 13, 31]].astype(np.float32), expected, rtol=2e-2, atol=2e-2)
    assert not np.allclose(features[0], features[13], atol=0.05)


def test_features_do_not_depend_on_batch_size_workers_or_run(data, encoder, tmp_path):
    out = tmp_path / "other.zarr"
    extract_slide(data["slide"], data["tiles"], out, encoder=encoder, batch_size=32, workers=0,
                  dtype="float32", progress=False)
    again, _, attrs = _load(out)
    reference, _, _ = _load(data["store"])
    assert again.dtype == np.float32 and attrs["dtype"] == "float32"
    np.testing.assert_allclose(again, reference.astype(np.float32), rtol=1e-2, atol=1e-2)


def test_auto_workers_give_a_gpu_job_all_its_cores_but_one_and_a_cpu_job_one_reader():
    assert resolve_workers("auto", "cuda", 8) == 7
    assert resolve_workers("auto", "cuda", 1) == 1
    assert resolve_workers("auto", "cpu", 8) == 1
    assert resolve_workers(3, "cuda", 8) == 3
    with raises_one_line_error(match="--workers: must be 0 or more, or auto, got -1"):
        resolve_workers(-1, "cpu", 8)


def test_cli_takes_workers_auto_and_refuses_other_words(data, tmp_path, capsys):
    out = tmp_path / "auto.zarr"
    args = [str(data["slide"]), str(data["tiles"]), "-o", str(out), "--device", "cpu", "--no-progress"]
    assert cli([*args, "--workers", "auto"]) == 0
    np.testing.assert_allclose(_load(out)[0], _load(data["store"])[0], atol=1e-3)
    with pytest.raises(SystemExit) as stop:
        cli([*args, "--workers", "many"])
    assert stop.value.code == 2
    assert "--workers: not a number of processes nor auto: 'many'" in capsys.readouterr().err


def test_complete_store_is_reused_and_other_tiles_are_recomputed(data, encoder, tmp_path):
    again = extract_slide(data["slide"], data["tiles"], data["store"], encoder=encoder, progress=False)
    assert again.skipped and again.n_patches == 32
    fewer = write_tiles(tmp_path / "fewer.parquet", _grid().iloc[:20], META)
    out = tmp_path / "fewer.zarr"
    result = extract_slide(data["slide"], fewer, out, encoder=encoder, workers=0, progress=False)
    assert not result.skipped and result.n_patches == 20
    copy = tmp_path / "copy.zarr"
    shutil.copytree(out, copy)
    recomputed = extract_slide(data["slide"], data["tiles"], copy, encoder=encoder, workers=0, progress=False)
    assert not recomputed.skipped and _load(copy)[0].shape == (32, 1280)


def test_incomplete_store_is_not_trusted(data, tmp_path):
    broken = tmp_path / "broken.zarr"
    shutil.copytree(data["store"], broken)
    zarr.open_group(str(broken), mode="r+").attrs["complete"] = False
    assert is_complete(data["store"]) and not is_complete(broken)
    assert not is_complete(tmp_path / "absent.zarr")
    with raises_one_line_error(match="feature store is not marked complete"):
        open_store(broken)


def test_zero_tiles_give_an_empty_valid_store(data, encoder, tmp_path):
    tiles = write_tiles(tmp_path / "none.parquet", _grid().iloc[:0], META)
    out = tmp_path / "none.zarr"
    extract_slide(data["slide"], tiles, out, encoder=encoder, progress=False)
    features, coords, attrs = _load(out)
    assert features.shape == (0, 1280) and coords.shape == (0, 2)
    assert attrs["n_patches"] == 0 and "failed" not in attrs
    assert da.from_zarr(str(out), component="features").shape == (0, 1280)


def test_failed_tiling_gives_an_empty_store_that_says_why(encoder, tmp_path):
    meta = {"slide": "gone", "failed": "corrupt or unreadable slide: Not a TIFF file", "level": None,
            "downsample": None, "patch_size_level0": None, "patch_size": 256, "target_mpp": 0.5,
            "mpp": None, "mpp_source": None}
    tiles = write_tiles(tmp_path / "gone.parquet", _grid().iloc[:0], meta)
    out = tmp_path / "gone.zarr"
    extract_slide(tmp_path / "gone.svs", tiles, out, encoder=encoder, progress=False)
    features, _, attrs = _load(out)
    assert features.shape == (0, 1280)
    assert attrs["failed"] == meta["failed"] and attrs["slide_bytes"] is None




def test_corrupt_tile_is_left_out_and_recorded(data, encoder, tmp_path, caplog):
    slide = damage_tile(data["slide"], tmp_path / "slide.svs", index=10)  # row 1, column 2
    row = write_tiles(tmp_path / "row.parquet", _grid().iloc[8:16], META)  # the 8 patches of row 1
    out = tmp_path / "corrupt.zarr"
    with caplog.at_level(logging.WARNING, logger="preprocessing.features.extract"):
        result = extract_slide(slide, row, out, encoder=encoder, batch_size=3, max_bad_patch_fraction=0.2,
                               progress=False)
    features, coords, attrs = _load(out)
    assert result.bad == [(512, 256)]
    assert attrs["bad_patches"] == {"count": 1, "locations": [[512, 256]]}
    assert features.shape == (7, 1280) and [512, 256] not in coords.tolist()
    assert "slide.svs: 1 of 8 patches could not be decoded" in caplog.text
    # every other patch was read (the slide handle recovers) and matches the intact slide
    reference, ref_coords, _ = _load(data["store"])
    same = np.isin(ref_coords[:, 0] + 10**6 * ref_coords[:, 1], coords[:, 0] + 10**6 * coords[:, 1])
    np.testing.assert_allclose(features, reference[same], atol=1e-3)


def test_too_many_corrupt_tiles_fail_naming_the_slide(data, encoder, tmp_path):
    slide = damage_tile(data["slide"], tmp_path / "slide.svs", index=3)
    out = tmp_path / "bad.zarr"
    with raises_one_line_error(match=r"slide.svs: more than 1.00% of 32 patches cannot be decoded; "
                                         r"first at x=768, y=0"):
        extract_slide(slide, data["tiles"], out, encoder=encoder, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".bad.zarr*"))
    # as the workflow runs it (tiling.on_slide_error: record): a store without patches that says why
    recorded = extract_slide(slide, data["tiles"], out, encoder=encoder, progress=False,
                             on_slide_error="record")
    features, coords, attrs = _load(out)
    assert features.shape == (0, 1280) and coords.shape == (0, 2) and attrs["n_patches"] == 0
    assert attrs["failed"].startswith("more than 1.00% of 32 patches cannot be decoded")
    assert recorded.failed == attrs["failed"] and recorded.n_tiles == 32
    gone = tmp_path / "gone.svs"
    assert cli([str(gone), str(data["tiles"]), "-o", str(tmp_path / "gone.zarr"), "--no-progress",
                "--on-slide-error", "record"]) == 0
    assert _load(tmp_path / "gone.zarr")[2]["failed"] == "no such file or folder"
    other = write_tiles(tmp_path / "other.parquet", _grid(), {**META, "slide": "TCGA-XX-0000-01Z"})
    with raises_one_line_error(match="tiles were made from slide"):  # a pipeline error still fails
        extract_slide(slide, other, tmp_path / "o.zarr", encoder=encoder, progress=False,
                      on_slide_error="record")


class _NaNModel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 4)
        out[-1, 0] = float("nan")
        return out


class _ZeroModel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 4)


def test_all_zero_features_are_written_so_training_opens_the_store(data, tmp_path):
    """zarr leaves a chunk equal to its fill value unwritten unless told; training reads a missing
    chunk as damage, so every chunk must be on disk, zeros included."""
    blank = Encoder("zero", _ZeroModel(), 4, (32, 32), (0.5,) * 3, (0.5,) * 3, "bilinear", "random", None)
    out = tmp_path / "zero.zarr"
    extract_slide(data["slide"], data["tiles"], out, encoder=blank, batch_size=32, workers=0, progress=False)
    store = open_store(out)
    assert store.n > 0 and not _load(out)[0].any()


def test_non_finite_features_fail_naming_the_slide(data, tmp_path):
    broken = Encoder("nan", _NaNModel(), 4, (32, 32), (0.5,) * 3, (0.5,) * 3, "bilinear", "random", None)
    out = tmp_path / "nan.zarr"
    with raises_one_line_error(match=r"slide.svs: non-finite features for the patch at x=1792, y=0"):
        extract_slide(data["slide"], data["tiles"], out, encoder=broken, batch_size=32, progress=False)
    assert not out.exists()


def test_tiles_of_a_replaced_slide_are_refused_and_a_store_of_other_tiles_is_not_reused(
    data, encoder, tmp_path
):
    """Tiles made for another pyramid would read patches of the wrong size; a store made for tiles at
    another level (same coordinates) holds other pixels."""
    stale = write_tiles(tmp_path / "stale.parquet", _grid(), {**META, "level": 0, "downsample": 2.0})
    said = r"stale.parquet: says level 0 has downsample 2, but slide.svs has 1"
    with raises_one_line_error(match=said):
        extract_slide(data["slide"], stale, tmp_path / "s.zarr", encoder=encoder, progress=False)
    out = tmp_path / "level.zarr"
    shutil.copytree(data["store"], out)
    half = write_tiles(tmp_path / "half.parquet", _grid(), {**META, "target_mpp": 1.0, "patch_size": 128})
    result = extract_slide(data["slide"], half, out, encoder=encoder, workers=0, progress=False)
    assert not result.skipped and _load(out)[2]["patch_size"] == 128


def test_tiles_of_another_slide_are_refused(data, encoder, tmp_path):
    tiles = write_tiles(tmp_path / "other.parquet", _grid(), {**META, "slide": "TCGA-XX-0000-01Z"})
    with raises_one_line_error(match=r"other.parquet: tiles were made from slide 'TCGA-XX-0000-01Z'"):
        extract_slide(data["slide"], tiles, tmp_path / "o.zarr", encoder=encoder, progress=False)


@pytest.mark.parametrize(
    ("x", "said"),
    [("a", r"not whole non-negative pixel numbers; first at row 0: x=a,"),
     (float("nan"), r"not whole non-negative pixel numbers; first at row 0: x=nan,"),
     (-256, r"not whole non-negative pixel numbers; first at row 0: x=-256.0,"),
     (10**7, r"patch at x=10000000, y=0 lies outside slide.svs")],
)
def test_patch_positions_that_cannot_be_read_are_refused(data, encoder, tmp_path, x, said):
    """A hand-made or damaged tiles table: text, NaN (once cast to int64, a store of garbage marked
    complete), a negative position or one beyond the slide (blank patches) must not be embedded."""
    grid = _grid().astype({"x": str if isinstance(x, str) else float})
    grid.loc[0, "x"] = x
    frame = pd.DataFrame({"x": grid["x"], "y": grid["y"], "tissue_fraction": grid["tissue_fraction"]})
    path = tmp_path / "bad.parquet"
    frame.to_parquet(path)
    import pyarrow.parquet as pq  # the metadata of a good tiles file, on the damaged table
    table = pq.read_table(path)
    table = table.replace_schema_metadata({**table.schema.metadata, **pq.read_schema(data["tiles"]).metadata})
    pq.write_table(table, path)
    out = tmp_path / "bad.zarr"
    with raises_one_line_error(match=said):
        extract_slide(data["slide"], path, out, encoder=encoder, progress=False)
    assert not out.exists()


def test_cli_reports_a_missing_tiles_file_in_one_line(data, tmp_path, capsys):
    missing = tmp_path / "missing.parquet"
    ran = run_healnet(capsys, "extract", data["slide"], missing, "-o", tmp_path / "m.zarr")
    line = assert_one_line_error(ran, command="extract", status=1)
    assert line == f"healnet extract: error: {missing}: tiles file not found"


def test_killed_run_leaves_nothing_complete_and_a_rerun_finishes(data, tmp_path):
    out = tmp_path / "killed.zarr"
    args = [str(data["slide"]), str(data["tiles"]), "-o", str(out), "--workers", "1", "--no-progress"]
    command = [sys.executable, "-m", "healnet.cli", "extract", *args, "--batch-size", "1", "--threads", "2"]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".killed.zarr.tmp-*")):
            assert proc.poll() is None, "healnet extract ended before it could be killed"
            assert time.monotonic() < deadline, "no temporary store appeared"
            time.sleep(0.01)
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and not is_complete(out)
    assert list(tmp_path.glob(".killed.zarr.tmp-*"))  # the half-written store is hidden, never OUT

    assert cli(args) == 0
    assert not list(tmp_path.glob(".killed.zarr.tmp-*"))  # the rerun cleared the leftovers
    features, coords, attrs = _load(out)
    reference, ref_coords, ref_attrs = _load(data["store"])
    np.testing.assert_allclose(features, reference, atol=1e-3)
    assert np.array_equal(coords, ref_coords) and attrs["weights_sha256"] == ref_attrs["weights_sha256"]


def test_stain_normalisation_is_applied_and_recorded(data, encoder, tmp_path):
    reference = tmp_path / "reference.png"
    cv2.imwrite(str(reference), cv2.cvtColor(skimage.data.immunohistochemistry()[::-1, :, ::-1],
                                             cv2.COLOR_RGB2BGR))
    few = write_tiles(tmp_path / "few.parquet", _grid().iloc[:4], META)
    out = tmp_path / "stain.zarr"
    extract_slide(data["slide"], few, out, encoder=encoder, workers=0, stain_norm="reinhard",
                  stain_reference=reference, progress=False)
    features, _, attrs = _load(out)
    assert attrs["stain_norm"] == {"method": "reinhard", "reference": "reference.png",
                                   "reference_sha256": sha256_file(reference)}
    plain = _load(data["store"])[0][:4]
    assert features.shape == plain.shape and not np.allclose(features, plain, atol=0.05)
    with raises_one_line_error(match=r"absent.png: stain reference image missing or unreadable"):
        extract_slide(data["slide"], few, tmp_path / "s2.zarr", encoder=encoder, stain_norm="macenko",
                      stain_reference=tmp_path / "absent.png", progress=False)


def test_tiles_meta_is_read_back_as_written(data):
    frame, meta = read_tiles(data["tiles"])
    assert meta == META and len(frame) == 32


def test_batches_cover_every_tile_once_in_order_with_a_short_first_one():
    batches = batch_indices(150, 64)
    assert [len(b) for b in batches] == [8, 64, 64, 14]
    assert sum(batches, []) == list(range(150))
    assert batch_indices(0, 64) == [] and batch_indices(3, 2) == [[0, 1], [2]]


def test_real_aperio_slide(real_slide, encoder, tmp_path):
    slide = real_slide
    tiles = write_tiles(tmp_path / "cmu.parquet",
                        pd.DataFrame({"x": [514, 771, 514, 771], "y": [1285, 1285, 1542, 1542],
                                      "tissue_fraction": 1.0}),
                        {**META, "slide": "CMU-1-Small-Region", "patch_size_level0": 257, "mpp": 0.499})
    out = tmp_path / "cmu.zarr"
    extract_slide(slide, tiles, out, encoder=encoder, workers=0, progress=False)
    features, coords, attrs = _load(out)
    assert features.shape == (4, 1280) and np.isfinite(features).all()
    assert attrs["slide"] == slide.name and attrs["slide_bytes"] == slide.stat().st_size
    assert attrs["read_size"] == 257 and attrs["mpp"] == 0.499


class _InputDependentModel(nn.Module):
    """A forward pass whose branch depends on the input's values: tracing would record one branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))
        return pooled * 2 if bool(pooled.mean() > 0) else pooled - 1


def test_cpu_runner_freezes_the_encoder_only_when_that_keeps_its_features(encoder):
    batch = torch.randint(0, 256, (20, *encoder.input_size, 3), dtype=torch.uint8)
    frozen, eager = FeatureRunner(encoder, torch.device("cpu")), FeatureRunner(encoder, torch.device("cpu"),
                                                                               freeze=False)
    assert frozen.frozen and not eager.frozen
    torch.testing.assert_close(frozen(batch), eager(batch), rtol=1e-3, atol=1e-3)

    odd = Encoder("odd", _InputDependentModel(), 3, (8, 8), (0.5,) * 3, (0.5,) * 3, "bilinear", "random",
                  None)
    runner = FeatureRunner(odd, torch.device("cpu"))
    assert not runner.frozen
    small = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8)
    torch.testing.assert_close(runner(small), FeatureRunner(odd, torch.device("cpu"), freeze=False)(small))


def test_padding_a_short_batch_to_one_shape_leaves_each_patchs_features_unchanged(encoder):
    # On a GPU the runner pads the first and last batches of a slide to the full batch size.
    batch = torch.randint(0, 256, (3, *encoder.input_size, 3), dtype=torch.uint8)
    padded = FeatureRunner(encoder, torch.device("cpu"), freeze=False, pad_to=8)
    out = padded(batch)
    assert out.shape == (3, encoder.feature_dim)
    torch.testing.assert_close(out, FeatureRunner(encoder, torch.device("cpu"), freeze=False)(batch))
    torch.testing.assert_close(padded(batch[1:2]), out[1:2])


def test_patch_loop_with_one_padded_batch_shape_writes_the_reference_features(data, encoder, tmp_path):
    # The GPU path on CPU: warm-up, a short first batch padded to the batch size, reader processes.
    runner = FeatureRunner(encoder, torch.device("cpu"), freeze=False, pad_to=12)
    frame, meta = read_tiles(data["tiles"])
    coords = frame[["x", "y"]].to_numpy(np.int64)
    dataset = PatchDataset(data["slide"], coords, 0, PATCH, encoder.input_size, encoder.interpolation)
    array = zarr.create_array(str(tmp_path / "f.zarr"), shape=(len(coords), 1280), chunks=(32, 1280),
                              dtype="float16")
    writer = RowWriter(array, 32)
    loop = _embed_patches(dataset, runner, writer, slide=data["slide"], batch_size=12, workers=1,
                          max_bad_patch_fraction=0.0, progress=False)
    assert writer.close() == 32 and loop.kept.all() and not loop.bad
    np.testing.assert_allclose(array[:], _load(data["store"])[0], atol=2e-2)


def test_frozen_encoder_file_gives_the_same_store_and_is_checked(data, encoder, tmp_path):
    frozen = tmp_path / "encoder.pt"
    assert healnet_main(["encoder", "--encoder", "efficientnet_lite0", "-o", str(frozen)]) == 0
    out = tmp_path / "from_file.zarr"
    extract_slide(data["slide"], data["tiles"], out, encoder_file=frozen, device="cpu", progress=False)
    got, _, attrs = _load(out)
    reference, _, ref_attrs = _load(data["store"])
    np.testing.assert_allclose(got.astype(np.float32), reference.astype(np.float32), rtol=1e-2, atol=1e-2)
    assert {k: attrs[k] for k in ("encoder", "weights", "weights_sha256", "feature_dim")} == {
        k: ref_attrs[k] for k in ("encoder", "weights", "weights_sha256", "feature_dim")}
    with raises_one_line_error(match="holds encoder 'efficientnet_lite0'"):
        extract_slide(data["slide"], data["tiles"], tmp_path / "x.zarr", encoder="resnet50_trunc",
                      encoder_file=frozen, device="cpu", progress=False)
    # A frozen file made from a user's weights file, or with random weights, is refused unless the
    # extraction asks for exactly that.
    custom = tmp_path / "custom.pt"
    save_frozen_encoder(replace(encoder, weights_source="/weights/own.pth", weights_given=True), custom)
    with raises_one_line_error(match="'/weights/own.pth', not 'efficientnet_lite0' with its default"):
        extract_slide(data["slide"], data["tiles"], tmp_path / "c.zarr", encoder_file=custom, device="cpu",
                      progress=False)
    random = tmp_path / "random.pt"
    save_frozen_encoder(replace(encoder, weights_source="random", weights_sha256=None), random)
    with raises_one_line_error(match="holds RANDOM weights"):
        extract_slide(data["slide"], data["tiles"], tmp_path / "r.zarr", encoder_file=random, device="cpu",
                      progress=False)
    assert not (tmp_path / "c.zarr").exists() and not (tmp_path / "r.zarr").exists()
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a model")
    with raises_one_line_error(match="not a frozen encoder file"):
        extract_slide(data["slide"], data["tiles"], tmp_path / "y.zarr", encoder_file=broken, device="cpu",
                      progress=False)


def test_a_store_whose_rows_disagree_with_its_attributes_is_refused(tmp_path):
    out = tmp_path / "small.zarr"
    write_store(out, np.ones((3, 4), np.float16), np.arange(6).reshape(3, 2), {"encoder": "synthetic"})
    assert open_store(out).n == 3 and is_complete(out)
    features, coords = read_store(out, np.array([0, 2]))
    assert features.shape == (2, 4) and coords.tolist() == [[0, 1], [4, 5]]
    zarr.open_group(str(out), mode="r+").attrs["n_patches"] = 5
    assert not is_complete(out)
    with raises_one_line_error(match="says n_patches 5 but holds 3 rows; delete the store and rerun"):
        open_store(out)
