"""The epoch loop: AdamW on the discrete-time NLL (+ L1 on the omic input projection), with modality
dropout for multimodal models, early stopping on an inner validation split or weight averaging over
the last epochs, and a saved state that a killed job resumes from."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from healnet.data.bags import BagBatchSampler, BagDataset, checked_batches, make_loader
from healnet.data.resident import ResidentBags
from healnet.models.loss import nll_survival_loss
from healnet.settings import TrainingSettings
from healnet.training.resume import TrainingState, UnfinishedState
from healnet.training.scoring import all_flags, forward, inner_val_score, predict, to_device

log = logging.getLogger(__name__)


def train_model(
    model: torch.nn.Module,
    dataset: BagDataset,
    rows: np.ndarray,
    val_rows: np.ndarray | None,
    training: TrainingSettings,
    device: torch.device,
    seed: int,
    workers: int,
    weights: np.ndarray | None,
    multimodal: bool = False,
    unfinished: UnfinishedState | None = None,
    keep_final: bool = False,
    resident: ResidentBags | None = None,
) -> list[dict[str, Any]]:
    """Train in place; with ``val_rows`` keep the epoch with the best inner-validation c-index.

    ``multimodal`` models get ``training.modality_dropout``: each training sample that has both
    modalities loses one of them (50/50) with that probability, so the model also learns to predict
    from one modality (a seeded generator keeps runs reproducible). Batches are cut from ``resident``
    (the bags of ``rows`` already on ``device``: :func:`healnet.training.memory.resident_bags`) when
    given, else read by the loader's readers at every epoch. With ``unfinished``, training resumes
    from its saved state and saves its own at epoch ends; with ``keep_final`` also when training
    ends, so that a finished model (an ensemble member) is not trained again after a kill. Without
    ``val_rows``, a positive ``training.average_last_epochs`` leaves the model with the mean of its
    weights at the ends of the last that many epochs (stochastic weight averaging) instead of the
    last epoch's weights.
    """
    sampler = BagBatchSampler(rows, training.batch_size, shuffle=True, seed=seed, sample=True)
    loader = None if resident is not None else make_loader(dataset, sampler, workers,
                                                           pin_memory=device.type == "cuda")
    weight_t = torch.as_tensor(weights, device=device) if weights is not None else None
    drop_p = training.modality_dropout if multimodal else 0.0
    average_from = training.epochs - training.average_last_epochs
    state = TrainingState(
        model,
        torch.optim.AdamW(model.parameters(), lr=training.lr, weight_decay=training.weight_decay),
        AveragedModel(model) if val_rows is None and average_from < training.epochs else None,
        torch.Generator().manual_seed(seed),
        device,
    )
    first_epoch, last_saved = 0, time.monotonic()
    saved = unfinished.load() if unfinished is not None else None
    if saved is not None:
        first_epoch = state.restore(saved, training.epochs)
        log.info("resuming at epoch %d from %s", first_epoch, unfinished.path)
    for epoch in range(first_epoch, training.epochs):
        model.train()
        sampler.set_epoch(epoch)
        batches = checked_batches(loader) if resident is None else map(resident.collate, sampler)
        record = _train_epoch(state, batches, len(sampler), training, weight_t, drop_p)
        record = {"epoch": epoch, **record}
        if epoch == first_epoch > 0:
            record["resumed"] = True
        if val_rows is not None and len(val_rows):
            if _validate(state, record, dataset, val_rows, training, workers):
                break
        state.history.append(record)
        if state.averaged is not None and epoch >= average_from:
            state.averaged.update_parameters(model)
        _log_epoch(record)
        due = unfinished is not None and time.monotonic() - last_saved >= unfinished.every_s
        if due and epoch + 1 < training.epochs:
            state.save(unfinished, epoch)
            last_saved = time.monotonic()
    if keep_final and unfinished is not None and first_epoch < training.epochs:
        state.save(unfinished, training.epochs - 1, finished=True)
    return _finish(state)


def _drop_modalities(batch: dict[str, Any], drop_p: float, generator: torch.Generator,
                     device: torch.device) -> None:
    """Modality dropout, in place: each sample with both modalities loses one (50/50) with ``drop_p``."""
    drop, pick_wsi = torch.rand(2, len(batch["row"]), generator=generator) < torch.tensor([[drop_p], [0.5]])
    drop = drop.to(device) & batch["has_wsi"] & batch["has_omics"]
    pick_wsi = pick_wsi.to(device)
    batch["has_wsi"] = batch["has_wsi"] & ~(drop & pick_wsi)
    batch["has_omics"] = batch["has_omics"] & ~(drop & ~pick_wsi)


def _train_epoch(
    state: TrainingState,
    batches: Iterator[dict[str, Any]],
    n_steps: int,
    training: TrainingSettings,
    weight_t: torch.Tensor | None,
    drop_p: float,
) -> dict[str, Any]:
    """One pass over the training batches (``n_steps`` of them, gradients accumulated over
    ``training.grad_accumulation``); returns the epoch's loss and timings."""
    model, opt, device = state.model, state.optimizer, state.device
    accum, alpha, l1 = training.grad_accumulation, training.alpha, training.l1_omics
    total_loss, n_seen, wait, start = 0.0, 0, 0.0, time.perf_counter()
    opt.zero_grad(set_to_none=True)
    step = 0
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        wait += time.perf_counter() - t0
        if batch is None:
            break
        batch = to_device(batch, device)
        if drop_p > 0:
            _drop_modalities(batch, drop_p, state.dropout_generator, device)
        logits = forward(model, batch)
        w = weight_t[batch["row"]] if weight_t is not None else None
        loss = nll_survival_loss(logits, batch["bin"], batch["event"], alpha=alpha, weights=w)
        if l1 > 0:
            loss = loss + l1 * model.l1_penalty()
        (loss / accum).backward()
        step += 1
        if step % accum == 0 or step == n_steps:
            opt.step()
            opt.zero_grad(set_to_none=True)
        total_loss += float(loss.detach()) * len(batch["row"])
        n_seen += len(batch["row"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "train_loss": total_loss / max(n_seen, 1),
        "seconds": round(seconds, 3),
        "data_wait_fraction": round(wait / seconds, 4) if seconds > 0 else 0.0,
        "patients_per_s": round(n_seen / seconds, 2) if seconds > 0 else 0.0,
    }


def _validate(
    state: TrainingState,
    record: dict[str, Any],
    dataset: BagDataset,
    val_rows: np.ndarray,
    training: TrainingSettings,
    workers: int,
) -> bool:
    """Score the inner validation split into ``record`` and keep the best epoch; True when early
    stopping ends training here (``record`` is then in the history already)."""
    logits = predict(state.model, dataset, val_rows, state.device, {"full": all_flags(dataset, val_rows)},
                     workers)
    scored = inner_val_score(dataset, val_rows, logits["full"], training.alpha)
    score = scored.pop("score")
    record.update(scored)
    epoch = record["epoch"]
    if state.best is None or score > state.best[0]:
        state.best = (score, epoch, copy.deepcopy(state.model.state_dict()))
    elif epoch - state.best[1] >= training.patience:
        state.history.append(record)
        log.info("early stop at epoch %d (best %d, inner-validation score %.4f)",
                 epoch, state.best[1], state.best[0])
        return True
    return False


def _log_epoch(record: dict[str, Any]) -> None:
    log.info(
        "epoch %d loss %.4f %.1fs%s",
        record["epoch"],
        record["train_loss"],
        record["seconds"],
        f" inner-val c-index {record['inner_val_c_index']:.4f}" if "inner_val_c_index" in record else "",
    )


def _finish(state: TrainingState) -> list[dict[str, Any]]:
    """Leave the model with the averaged weights or the best epoch's; returns the history."""
    model, history = state.model, state.history
    if state.averaged is not None:
        model.load_state_dict(state.averaged.module.state_dict())
        history.append({"averaged_epochs": int(state.averaged.n_averaged)})
    if state.best is not None:
        model.load_state_dict(state.best[2])
        kept = next(r for r in history if r.get("epoch") == state.best[1])
        by = "inner_val_nll" if "inner_val_nll" in kept else "inner_val_c_index"
        history.append({"restored_epoch": state.best[1], by: kept[by]})
    return history
