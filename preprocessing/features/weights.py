"""Weights files of patch encoders: read a state dict, load it strictly into a model, and hash it.

A weights file is ``.safetensors`` or a ``torch.save`` file (``.pth``/``.pt``/``.bin``, tensors
only). The hashes are recorded in each feature store, and a finished store is reused only when
they match.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preprocessing.core.errors import InputError


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 over a model's tensors (names, shapes, bytes) for weights that came without a file."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors, or .pth/.pt/.bin (torch.load, tensors only).

    Common checkpoint wrappers (``{"state_dict": …}``, ``{"model": …}``) and a ``module.`` prefix
    from DataParallel are removed. Any problem is an :class:`InputError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure means an unusable file
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""  # torch's run to many lines
        raise InputError(path, f"cannot read weights ({type(err).__name__}: {first})") from err
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not state:
        raise InputError(path, "weights file holds no state dict")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(path, "weights file holds values that are not tensors")
    state = dict(state)
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def apply_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path,
                     drop_prefixes: tuple[str, ...] = (), names: Mapping[str, str] | None = None,
                     assign: bool = False) -> None:
    """Load ``state`` into ``model`` by key, strictly: every key present, none extra, same shapes.

    Keys under ``drop_prefixes`` (a classifier head, or layers a truncated model leaves out) are
    ignored when the model has no such key. ``names`` maps the file's key names to the model's where
    they differ (a published checkpoint's layout against the installed library's); the checks and
    their messages use the file's names. ``assign`` makes the file's tensors the model's (for a model
    built on the ``meta`` device). Mismatches raise :class:`InputError` naming ``source``.
    """
    own = model.state_dict()
    names = dict(names) if names is not None else {k: k for k in own}
    expected = {published: own[key] for published, key in names.items()}
    state = {k: v for k, v in state.items()
             if k in expected or not any(k.startswith(p) for p in drop_prefixes)}
    # BatchNorm's batch counter does nothing in eval mode, and older files (torchvision's ResNet-50,
    # which CLAM uses) do not hold it: torch's own strict loading fills it in too
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise InputError(source, "weights do not fit the model: " + "; ".join(parts))
    for key, tensor in expected.items():
        if key in state and tuple(state[key].shape) != tuple(tensor.shape):
            raise InputError(source, f"shape mismatch for {key}: file {tuple(state[key].shape)}, "
                                     f"model {tuple(tensor.shape)}")
    model.load_state_dict({names[k]: v for k, v in state.items()}, strict=True, assign=assign)
