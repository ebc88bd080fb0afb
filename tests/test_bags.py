"""Reading the slide bags (healnet.data.bags, resident, stores): batches padded and masked, the
decoded-feature cache of a dataset, bags kept in memory, and a damaged store as a one-line error
in training and in the report's heatmap reader."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from factory import Cohort, count_store_reads, damage_store, shared_cohort, train_args, write_config
from helpers import assert_one_line_error, raises_one_line_error, run_healnet

from healnet.data.bags import BagDataset, collate_bags
from healnet.data.resident import ResidentBags
from healnet.data.stores import index_stores
from healnet.report import attention as explain
from preprocessing.features.store import REEXTRACT
from preprocessing.omics.directory import load_omics_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Cohort, Path]:
    """The training tests' cohort (factory.training_cohort) and its default config."""
    return shared_cohort(tmp_path_factory)


def cohort_bags(data: Cohort) -> list[list]:
    """Each manifest patient's stores, as training finds them (none for a patient without any)."""
    manifest = load_omics_dir(data.omics_dir).manifest
    found, _ = index_stores(data.features_dir, manifest)
    return [found.get(p, []) for p in manifest["patient"]]


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


@pytest.mark.parametrize("workers", [0, 1])
def test_bags_of_a_batch_are_padded_with_zeros_and_masked(workers: int) -> None:
    # A reader process builds its batch in shared memory, left uninitialised: the padding must be
    # written, since masked patches still pass through the model's matrix products (NaN * 0 = NaN).
    rng = np.random.default_rng(0)
    bags = [rng.standard_normal((n, 5)).astype(np.float16) for n in (3, 7)] + [None]
    items = [{"row": i, "omics": np.zeros(2, np.float32), "has_omics": True, "has_wsi": b is not None,
              "bin": 0, "event": 1.0, "time": 1.0, "error": None, "wsi": b,
              "coords": None if b is None else np.full((len(b), 2), i + 1, np.float32)}
             for i, b in enumerate(bags)]
    loader = torch.utils.data.DataLoader(ListDataset(items), batch_size=3, collate_fn=collate_bags,
                                         num_workers=workers)
    for _ in range(2):  # the second batch of a worker may reuse the first one's memory
        batch = next(iter(loader))
        assert batch["wsi"].shape == (3, 7, 5) and batch["wsi"].dtype == torch.float16
        assert batch["wsi_mask"].sum(1).tolist() == [3, 7, 0]
        for i, b in enumerate(bags[:2]):
            assert torch.equal(batch["wsi"][i, : len(b)], torch.from_numpy(b))
            assert (batch["coords"][i, : len(b)] == i + 1).all()
        assert not batch["wsi"][0, 3:].any() and not batch["wsi"][2].any()
        assert not batch["coords"][0, 3:].any() and not batch["coords"][2].any()


def test_a_cache_that_cannot_be_written_costs_no_second_decoding(
    cohort: tuple[Cohort, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bags = cohort_bags(cohort[0])
    row = next(i for i, b in enumerate(bags) if b)
    n = len(bags)

    def dataset(cache_dir: Path | None) -> BagDataset:
        return BagDataset(np.zeros((n, 1), np.float32), np.ones(n, bool), bags, np.zeros(n, int),
                          np.ones(n), np.ones(n), cache_dir=cache_dir)

    reads = count_store_reads(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    unwritable = dataset(blocker)  # no cache file can be made inside a file
    features, coords = unwritable.read_bag(row)
    assert len(reads) == len(bags[row])  # each store decoded once, not again after the failed write
    assert unwritable.cache_dir is None and "not used from here on" in caplog.text
    expected = dataset(None).read_bag(row)
    np.testing.assert_array_equal(features, expected[0])
    np.testing.assert_array_equal(coords, expected[1])


def test_bags_kept_in_ram_are_copied_out_of_the_readers_shared_memory(cohort: tuple[Cohort, Path]) -> None:
    """On CPU, a kept bag that stayed a view of a reader's batch would hold that batch's shared-memory
    file descriptors open: two per patient, so a 500-patient fold hit the usual limit of 1,024."""
    bags = cohort_bags(cohort[0])
    n = len(bags)
    dataset = BagDataset(np.zeros((n, 1), np.float32), np.ones(n, bool), bags, np.zeros(n, int),
                         np.ones(n), np.ones(n))
    kept = ResidentBags(dataset, range(n), torch.device("cpu"), workers=1)
    assert kept.features and not any(t.is_shared() for t in [*kept.features.values(), *kept.coords.values()])
    row = next(iter(kept.features))
    np.testing.assert_array_equal(kept.features[row].numpy(), dataset.read_bag(row)[0])


@pytest.mark.parametrize("workers", [0, 1])
def test_a_damaged_feature_store_is_a_one_line_error(
    cohort: tuple[Cohort, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: int
) -> None:
    # a chunk that no longer decodes (disk or copy damage), read in the main process or in a reader
    data, _ = cohort
    damaged = tmp_path / "features"
    shutil.copytree(data.features_dir, damaged)
    store = damage_store(sorted(damaged.iterdir())[0], "undecodable")
    config = write_config(tmp_path / "c.yaml", {"workers": workers})
    ran = run_healnet(capsys, *train_args(replace(data, features_dir=damaged), config, "abmil", tmp_path,
                                          "--folds", "0", workers=None))
    assert_one_line_error(ran, store.name, REEXTRACT, command="train", status=1)
    assert not (tmp_path / "results" / "abmil" / "folds.csv").exists()
    # the report's heatmap reader says the same
    with raises_one_line_error(store.name, match=REEXTRACT):
        explain.read_bag(damaged, [store.name.removesuffix(".zarr")])
