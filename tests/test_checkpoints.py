"""A fold's checkpoint (healnet.data.checkpoints): it reproduces the predictions training saved, and a
damaged one is a one-line error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from factory import NO_WSI, Cohort, shared_cohort, shared_run
from helpers import raises_one_line_error

from healnet.data.checkpoints import load_checkpoint
from preprocessing.features.store import read_store
from preprocessing.omics.transforms import OmicTransform

DIM = 16  # the slide feature dim of factory.training_cohort

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    return shared_cohort(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def healnet_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_run(tmp_path_factory, "healnet")


def test_checkpoint_reproduces_the_saved_predictions(healnet_run: Path, cohort: Cohort) -> None:
    model, ckpt = load_checkpoint(healnet_run / "models" / "healnet" / "fold1.pt")
    # the default screen keeps 8 of the 10 rna columns (cox score on the training fold) and all 5 cnv
    assert ckpt["wsi_dim"] == DIM and ckpt["fold"] == 1 and len(ckpt["feature_names"]) == 8 + 5
    transform = OmicTransform.from_state_dict(ckpt["omic_transform"])
    feats = pd.read_parquet(cohort.omics_dir / "features.parquet")
    preds = pd.read_parquet(healnet_run / "results" / "healnet" / "predictions.parquet")
    preds = preds.query("fold == 1 and setting == 'full'").set_index("patient")
    patient = next(p for p in preds.index if p in feats.index and p not in NO_WSI)
    x = transform.transform(feats.loc[[patient]]).loc[:, ckpt["feature_names"]].to_numpy(np.float32)
    store = next(p for p in cohort.features_dir.iterdir() if p.name.startswith(patient))
    features, coords = read_store(store)
    wsi = torch.from_numpy(features.astype(np.float32))[None]
    with torch.no_grad():
        logits = model(wsi, None, torch.from_numpy(x), torch.tensor([True]), torch.tensor([True]),
                       wsi_coords=torch.from_numpy(coords)[None])
    risk = -torch.cumprod(1 - torch.sigmoid(logits), dim=-1).sum().item()
    assert risk == pytest.approx(preds.loc[patient, "risk"], abs=1e-4)
    assert ckpt["train_median_risk"] == pytest.approx(preds["train_median_risk"].iloc[0])


@pytest.mark.parametrize("damage", ["truncated", "junk"])
def test_a_damaged_checkpoint_is_a_one_line_error(healnet_run: Path, tmp_path: Path, damage: str) -> None:
    # truncated by a full disk or an interrupted copy, or not a checkpoint at all
    whole = (healnet_run / "models" / "healnet" / "fold1.pt").read_bytes()
    path = tmp_path / f"{damage}.pt"
    path.write_bytes(whole[: len(whole) // 2] if damage == "truncated" else b"junk")
    with raises_one_line_error("cannot read checkpoint", source=path):
        load_checkpoint(path)
