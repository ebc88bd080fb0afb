"""An unfinished fold's saved training state, so that a killed job resumes where it saved.

While a fold trains, its state (weights, optimiser, averaged weights, random generators, history,
best epoch so far) is saved at the end of an epoch at most every ``training.save_state_minutes`` to
``MODELS_DIR/unfinished-fold{k}.pt`` (``-member{i}`` for an ensemble's later members), and deleted
once ``fold{k}.pt`` is written. A rerun resumes at the saved epoch with the numbers an uninterrupted
run gives, provided the settings and data are those that made the file: the file carries a
fingerprint of them and is ignored when it does not match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from healnet.data.bags import BagDataset
from healnet.data.checkpoints import plain
from healnet.settings import TrainingSettings
from preprocessing.core.atomic import atomic_output

log = logging.getLogger(__name__)

# (inner-validation score, epoch, weights) of the best epoch so far
Best = tuple[float, int, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class UnfinishedState:
    """Where an unfinished fold keeps its training state, how often it saves it, and the fingerprint of
    the settings and data that the saved state is only valid for."""

    path: Path
    every_s: float
    fingerprint: str

    def load(self) -> dict[str, Any] | None:
        """The saved state if it exists and matches; otherwise None (training starts from epoch 0)."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - an unreadable file only costs the saved epochs
            log.warning("%s: ignored, cannot be read (%s); training starts again", self.path, err)
            return None
        if state.get("fingerprint") != self.fingerprint:
            log.warning("%s: ignored, saved with other settings or data; training starts again", self.path)
            return None
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` with this fingerprint, atomically."""
        with atomic_output(self.path) as tmp:
            torch.save({**state, "fingerprint": self.fingerprint}, tmp)


def training_fingerprint(
    spec: dict[str, Any],
    training: TrainingSettings,
    device: torch.device,
    seed: int,
    dataset: BagDataset,
    rows: Sequence[int],
    val_rows: Sequence[int] | None,
) -> str:
    """A digest of everything a fold's training depends on: model, learning settings, device type,
    seed, the patients trained on, their inputs and labels, and each feature store (name, size,
    modification time: a re-extracted store is a new directory)."""
    digest = hashlib.sha256()
    described = {"spec": spec, "training": dataclasses.asdict(training), "device": device.type,
                 "seed": seed, "rows": list(rows), "val_rows": None if val_rows is None else list(val_rows)}
    digest.update(json.dumps(plain(described), sort_keys=True, default=str).encode())
    for array in (dataset.omics, dataset.has_omics, dataset.bins, dataset.events, dataset.times):
        digest.update(np.ascontiguousarray(array).tobytes())
    for bag in dataset.bags:
        for store in bag:
            digest.update(f"{store.path.name}:{store.n}:{store.dim}:{os.stat(store.path).st_mtime_ns};".encode())
    return digest.hexdigest()


@dataclass
class TrainingState:
    """What the epoch loop carries from one epoch to the next, and what a saved state holds: the
    model, its optimiser, the running weight average (None without averaging), the modality-dropout
    generator, the per-epoch history and the best epoch so far (early stopping)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    averaged: AveragedModel | None
    dropout_generator: torch.Generator
    device: torch.device
    history: list[dict[str, Any]] = field(default_factory=list)
    best: Best | None = None

    def save(self, unfinished: UnfinishedState, epoch: int, finished: bool = False) -> None:
        """Save the state at the end of ``epoch`` (``finished``: training is over)."""
        rng = {"torch": torch.get_rng_state(), "modality_dropout": self.dropout_generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        best = self.best
        kept = None if best is None else (best[0], best[1], {k: v.cpu() for k, v in best[2].items()})
        unfinished.save({
            "epoch": epoch,
            "finished": finished,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "averaged": None if self.averaged is None else self.averaged.state_dict(),
            "rng": rng,
            "history": self.history,
            "best": kept,
        })

    def restore(self, saved: dict[str, Any], epochs: int) -> int:
        """Take up a saved state; returns the first epoch still to train (``epochs`` when finished)."""
        self.model.load_state_dict(saved["model"])
        if self.averaged is not None:
            self.averaged.load_state_dict(saved["averaged"])
        self.optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"]["torch"])
        self.dropout_generator.set_state(saved["rng"]["modality_dropout"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(saved["rng"]["cuda"], self.device)
        self.history, self.best = saved["history"], saved["best"]
        return epochs if saved.get("finished") else int(saved["epoch"]) + 1
