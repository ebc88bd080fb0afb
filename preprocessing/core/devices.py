"""The ``--device`` setting of extraction and training (``auto``, ``cpu`` or ``cuda``) as a torch device."""

from __future__ import annotations

import torch

from preprocessing.core.errors import InputError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU, or another word: InputError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device", "cuda requested but no CUDA device is available")
    if name not in DEVICES:
        raise InputError("--device", f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)
