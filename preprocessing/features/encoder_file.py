"""The frozen encoder file and ``healnet encoder``, which writes it once per cohort and encoder.

The file is one TorchScript module, the encoder traced and frozen (batch norm folded into the
convolutions), with the :class:`~preprocessing.features.encoders.Encoder` description in its
``encoder.json`` extra file. Extraction jobs load it instead of building the encoder through timm.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from preprocessing.core.atomic import atomic_output
from preprocessing.core.errors import InputError
from preprocessing.features.encoders import Encoder, add_encoder_arguments, build_encoder

log = logging.getLogger(__name__)


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
    is chosen here, at load time. Loading needs no timm, so a job skips importing it (and, with it,
    torchvision and torch._dynamo), which takes seconds.
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
                       weights_sha256=meta["weights_sha256"], weights_given=bool(meta["weights_given"]),
                       model_id=meta.get("model_id"))
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as err:
        reason = (str(err).splitlines() or [""])[0].split(". ")[0][:200]
        raise InputError(path, f"not a frozen encoder file ({type(err).__name__}: {reason})") from err


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
