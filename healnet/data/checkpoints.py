"""The fold checkpoint ``fold{k}.pt``: what training writes for each fold, and how it is read back.

A checkpoint is a dict of plain Python values (lists, numbers, strings) and the model's tensors, so
that it loads with ``torch.load(..., weights_only=True)``: no pickled objects.

Keys: model_spec, state_dict, omic_transform and time_bins (``state_dict()`` of OmicTransform /
TimeBins, as plain lists), feature_names and omic_groups (the column order the model sees), wsi_dim,
train_median_risk, train_mean_survival, fold, train_patients, test_patients, training (the learning
settings) and run (the run settings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from healnet.models.baselines import build_model
from preprocessing.core.atomic import atomic_output
from preprocessing.core.errors import InputError


def plain(obj: Any) -> Any:
    """NumPy arrays and scalars -> lists and Python numbers, so checkpoints load with weights_only=True."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def write_checkpoint(path: Path, contents: dict[str, Any], model: torch.nn.Module) -> None:
    """Write ``contents`` (the keys listed above but ``state_dict``, made plain) and ``model``'s
    weights (on the CPU) to ``path``, atomically."""
    checkpoint = plain(contents)
    checkpoint["state_dict"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_output(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a trained model (eval mode) from ``fold{k}.pt``; returns (model, checkpoint dict)."""
    try:
        ckpt = torch.load(Path(path), map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever torch.load trips on, the file is unusable
        reason = " ".join(str(err).split()) or type(err).__name__
        raise InputError(path, f"cannot read checkpoint ({reason}); delete it and rerun its fold") from err
    model = build_model(ckpt["model_spec"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt
