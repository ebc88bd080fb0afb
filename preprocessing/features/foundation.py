"""Building the registered pathology foundation models (:mod:`preprocessing.features.registry`) with
their published weights.

Each model is built on the ``meta`` device (no memory, no random initialisation: a ViT-giant would
otherwise spend half a minute initialising weights that are thrown away), then the weights file is
checked key by key against the published layout and assigned. Where the installed ``transformers``
names tensors differently from the published checkpoint (transformers 5 renamed ViT's), the
published names are mapped onto the model's, and errors name the file's keys.

Weights come from a file or a folder the user names (``--weights``), or else from the local Hugging
Face cache with the hub offline: nothing is downloaded here. A gated model that is in neither gives a
one-line error with the command that fetches it.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from preprocessing.core.errors import InputError
from preprocessing.features.registry import EncoderInfo, fetch_command
from preprocessing.features.weights import apply_state_dict, load_weights_file, sha256_file

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# output rules


class ClassAndPatchMean(nn.Module):
    """Virchow's features: the class token concatenated with the mean of the patch tokens (the
    register tokens, which sit between them, are left out)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        self.prefix = int(vit.num_prefix_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit(x)
        return torch.cat([tokens[:, 0], tokens[:, self.prefix:].mean(dim=1)], dim=-1)


class TransformersClassToken(nn.Module):
    """The class token of a ``transformers`` vision model's last hidden state."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).last_hidden_state[:, 0]


class AttentionalPool(nn.Module):
    """CONCH's contrastive pooler: learned queries attend over the trunk's tokens (multi-head, no
    biases), with LayerNorms on the queries and on the tokens."""

    def __init__(self, dim: int, context_dim: int, heads: int = 8, queries: int = 1) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(queries, dim))
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch = tokens.shape[0]
        q = self.to_q(self.ln_q(self.query)).expand(batch, -1, -1)
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class ConchVisionTower(nn.Module):
    """CONCH v1.5's image encoder as TRIDENT builds it: a ViT-L/16 trunk with layer scale, its tokens
    pooled by one learned query, then LayerNorm; 768-d, without the contrastive projection."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPool(768, int(trunk.embed_dim))
        self.ln_contrast = nn.LayerNorm(768)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])


def conch_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """A CONCH v1.5 file's position embedding (class entry + a square grid) at ``grid`` x ``grid``,
    computed the way its loader does at run time: the file's grid brought to the 224 px grid (14 x
    14, bilinear) once, then scaled bicubically by (grid + 0.1) / 14, as iBOT's interpolation does."""
    cls, patches = pos[:, :1], pos[:, 1:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1] or side == 0:
        raise ValueError(f"{patches.shape[1]} position entries are not a square grid")
    image = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    if side != 14:
        image = F.interpolate(image, size=(14, 14), mode="bilinear", align_corners=False)
    scale = (grid + 0.1) / 14
    image = F.interpolate(image, scale_factor=(scale, scale), mode="bicubic")
    return torch.cat([cls.float(), image.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


# ---------------------------------------------------------------------------------------------
# architectures


def _timm_vit(info: EncoderInfo) -> nn.Module:
    import timm

    kwargs = dict(info.kwargs)
    if info.mlp == "swiglu_packed":
        kwargs.update(mlp_layer=timm.layers.SwiGLUPacked, act_layer=nn.SiLU)
    if info.depth is not None:
        kwargs["depth"] = info.depth
    return timm.create_model(info.arch, pretrained=False, **kwargs)


def _transformers_model(info: EncoderInfo) -> nn.Module:
    import transformers

    kwargs = dict(info.kwargs)
    if info.depth is not None:
        kwargs["num_hidden_layers"] = info.depth
    if info.arch == "ViTModel":
        return transformers.ViTModel(transformers.ViTConfig(**kwargs), add_pooling_layer=False)
    if info.arch == "Dinov2Model":
        return transformers.Dinov2Model(transformers.Dinov2Config(**kwargs))
    raise ValueError(f"no builder for transformers class {info.arch}")


def build_architecture(info: EncoderInfo) -> nn.Module:
    """``info``'s model with its output rule applied, weights uninitialised where built on ``meta``."""
    if info.kind == "transformers":
        return TransformersClassToken(_transformers_model(info))
    vit = _timm_vit(info)
    if info.kind == "conch_v15":
        return ConchVisionTower(vit)
    return ClassAndPatchMean(vit) if info.kwargs.get("global_pool") == "" else vit


# ---------------------------------------------------------------------------------------------
# published key names


_VIT_V5_TO_PUBLISHED = (  # transformers 5 ViT names -> the names the published (transformers 4) files use
    (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
)


def published_name(info: EncoderInfo, key: str) -> str:
    """The name the published checkpoint gives the model's tensor ``key`` (model wrappers stripped)."""
    for wrapper in ("vit.", "model."):
        if key.startswith(wrapper) and info.kind != "conch_v15":
            key = key[len(wrapper):]
            break
    if info.arch == "ViTModel":
        for pattern, repl in _VIT_V5_TO_PUBLISHED:
            key = re.sub(pattern, repl, key)
    return key


def key_map(info: EncoderInfo, model: nn.Module) -> dict[str, str]:
    """Published name -> model name, for every tensor of ``model``."""
    return {published_name(info, key): key for key in model.state_dict()}


# ---------------------------------------------------------------------------------------------
# weights


@dataclass(frozen=True)
class Weights:
    """A located weights file: where it is and how to cite it."""

    path: Path
    source: str  # what the store records: the path given (file or folder), or ``hf-hub:REPO/FILE``


def hub_cache_dir() -> str:
    """The Hugging Face hub cache, read from the environment at call time (HF_HUB_CACHE, HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def cached_weights(info: EncoderInfo) -> Weights | None:
    """``info``'s weights file in the local Hugging Face cache, or None; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    cache = hub_cache_dir()
    for filename in info.files:
        found = try_to_load_from_cache(info.repo, filename, cache_dir=cache)
        if isinstance(found, str) and Path(found).is_file():
            return Weights(Path(found), f"hf-hub:{info.repo}/{filename}")
    return None


def locate_weights(info: EncoderInfo, weights: str | Path | None) -> Weights | None:
    """The file ``weights`` names (a folder: the registry's file inside it), else the cached hub file.

    None when neither exists; a folder without the file is an :class:`InputError`.
    """
    if weights is None:
        return cached_weights(info)
    path = Path(weights)
    if path.is_dir():
        for filename in info.files:
            if (path / filename).is_file():
                return Weights(path / filename, str(path))
        raise InputError(path, f"holds none of {', '.join(info.files)} "
                               f"({info.title} weights from {info.repo})")
    return Weights(path, str(path))


def missing_weights_error(info: EncoderInfo) -> InputError:
    """The one-line error for a model whose weights are neither given nor cached."""
    gate = "accept its terms at https://huggingface.co/{repo}, then " if info.gated else ""
    return InputError(
        info.name, f"no weights for {info.title}: not given (--weights / extract.weights) and not in the "
                   f"Hugging Face cache ({hub_cache_dir()}); {gate.format(repo=info.repo)}fetch them with "
                   f"`{fetch_command(info)}` and pass that folder as --weights")


def _as_float32(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v
            for k, v in state.items()}


def load_foundation(info: EncoderInfo, found: Weights) -> nn.Module:
    """``info``'s model with the weights of ``found``, checked strictly against the published layout."""
    with torch.device("meta"):
        model = build_architecture(info)
    state = _as_float32(load_weights_file(found.path))
    if info.kind == "conch_v15" and "trunk.pos_embed" in state:
        grid = info.input_size // int(info.kwargs["patch_size"])
        try:
            state["trunk.pos_embed"] = conch_pos_embed(state["trunk.pos_embed"], grid)
        except ValueError as err:
            shape = tuple(state["trunk.pos_embed"].shape)
            raise InputError(found.source, f"trunk.pos_embed {shape}: {err}") from err
    apply_state_dict(model, state, found.source, info.drop_prefixes, names=key_map(info, model), assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise InputError(found.source, f"weights leave tensors unset: {', '.join(left[:3])}")
    return model.eval()


def random_foundation(info: EncoderInfo) -> nn.Module:
    """``info``'s model with its own random initialisation (only for an explicit allow-random run)."""
    return build_architecture(info).eval()


def foundation_model(info: EncoderInfo, weights: str | Path | None) -> tuple[nn.Module, str, str]:
    """``info``'s model with its weights, where they came from and the weights file's sha256."""
    found = locate_weights(info, weights)
    if found is None:
        raise missing_weights_error(info)
    model = load_foundation(info, found)
    log.info("%s: weights %s", info.name, found.source)
    return model, found.source, sha256_file(found.path)
