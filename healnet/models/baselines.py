"""Baselines trained in the same harness as HEALNet, and the name -> model registry.

- ``snn``: omic self-normalising network (Klambauer et al. 2017; SELU, AlphaDropout, LeCun-normal init),
  the MCAT omic baseline.
- ``abmil``: gated attention MIL over WSI patch features (Ilse et al. 2018).
- ``perceiver``: early fusion: WSI patch tokens and omic tokens projected to one dim, tagged with a
  modality embedding, concatenated, and read by ONE shared cross-attention per layer.
- ``coxph``: a ridge-penalised linear Cox model (:mod:`healnet.models.coxph`), fitted in closed form.
- ``late_fusion``: the SNN and ABMIL above, their hazard logits combined by a learned linear layer
  (initialised to the average) when both modalities are present, else the available branch alone.

Every model has the HEALNet call signature ``forward(wsi, wsi_mask, omics, has_wsi, has_omics,
return_attention=False, wsi_coords=None)`` and an ``l1_penalty()`` on its omic input projection, so
the trainer treats them alike. Models are rebuilt from a JSON-able spec (:func:`build_model`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from healnet.modalities import MODEL_MODALITIES, READS_HEALNET_SETTINGS
from healnet.models.coxph import CoxPH
from healnet.models.ensemble import SeedEnsemble
from healnet.models.healnet import (
    LATENT_KEYS,
    HEALNet,
    LatentSettings,
    fourier_features,
    normalise_coords,
)
from healnet.settings import HealnetSettings, TrainingSettings


def _real_tokens(wsi_mask: Tensor | None, wsi: Tensor) -> Tensor:
    if wsi_mask is None:
        return torch.ones(wsi.shape[:2], dtype=torch.bool, device=wsi.device)
    return wsi_mask


class SNN(nn.Module):
    """Self-normalising MLP on the omic vector: ``F -> hidden x n_layers -> n_bins``."""

    def __init__(
        self, *, n_omics: int, n_bins: int, hidden: int, dropout: float, n_layers: int = 2
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dims = [n_omics] + [hidden] * n_layers
        for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(d_in, d_out), nn.SELU(), nn.AlphaDropout(dropout)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(dims[-1], n_bins)
        for module in self.modules():
            if isinstance(module, nn.Linear):  # LeCun normal, as SELU networks need
                nn.init.normal_(module.weight, std=1 / math.sqrt(module.in_features))
                nn.init.zeros_(module.bias)

    def forward(
        self,
        wsi: Tensor | None,
        wsi_mask: Tensor | None,
        omics: Tensor | None,
        has_wsi: Tensor,
        has_omics: Tensor,
        return_attention: bool = False,
        wsi_coords: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, list[Tensor]]]:
        """Hazard logits from omics (samples without omics get meaningless logits; callers impute)."""
        if omics is None:
            raise ValueError("SNN needs omics")
        logits = self.head(self.body(omics.float()))
        return (logits, {}) if return_attention else logits

    def l1_penalty(self) -> Tensor:
        """L1 norm of the first (input) layer's weights."""
        return self.body[0].weight.abs().sum()


class GatedABMIL(nn.Module):
    """Gated attention MIL: ``a_i = w^T (tanh(V h_i) * sigmoid(U h_i))``, softmax over real patches."""

    def __init__(
        self, *, wsi_dim: int, n_bins: int, hidden: int, dropout: float, attn_dim: int = 128
    ) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(wsi_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attn_v = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Tanh())
        self.attn_u = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Sigmoid())
        self.attn_w = nn.Linear(attn_dim, 1)
        self.rho = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden, n_bins)

    def forward(
        self,
        wsi: Tensor | None,
        wsi_mask: Tensor | None,
        omics: Tensor | None,
        has_wsi: Tensor,
        has_omics: Tensor,
        return_attention: bool = False,
        wsi_coords: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, list[Tensor]]]:
        """Hazard logits from the patch bag; attention ``[B, 1, 1, N]`` under key ``wsi``."""
        if wsi is None:
            raise ValueError("ABMIL needs WSI features")
        mask = _real_tokens(wsi_mask, wsi)
        mask = mask | ~mask.any(dim=1, keepdim=True)  # empty bag: finite output, imputed by the caller
        h = self.embed(wsi.float())
        scores = self.attn_w(self.attn_v(h) * self.attn_u(h)).squeeze(-1)
        attn = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(dim=-1)
        pooled = (attn.unsqueeze(-1) * h).sum(dim=1)
        logits = self.head(self.rho(pooled))
        return (logits, {"wsi": [attn[:, None, None, :]]}) if return_attention else logits

    def l1_penalty(self) -> Tensor:
        """No omic input: zero."""
        return self.head.weight.new_zeros(())


class EarlyFusionPerceiver(nn.Module):
    """Perceiver over ONE token sequence: projected WSI patch tokens followed by projected omic tokens.

    Missing modalities are masked out of that sequence per sample. Arguments are HEALNet's: the
    :class:`~healnet.models.healnet.LatentSettings` keywords, whose names and defaults live there.
    """

    def __init__(
        self,
        *,
        wsi_dim: int | None,
        n_omics: int | None,
        n_bins: int = 4,
        omic_groups: Sequence[tuple[str, int]] | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        s = self.settings = LatentSettings.parse(type(self).__name__, settings)
        if wsi_dim is None and n_omics is None:
            raise ValueError("the Perceiver needs at least one modality")
        self.wsi_proj = nn.Linear(wsi_dim + 2 * s.fourier_dim, s.latent_dim) if wsi_dim is not None else None
        if n_omics is not None:
            self.omic_tokenizer = s.omic_tokenizer(n_omics, omic_groups)
            self.omic_proj = nn.Linear(s.omic_token_dim + s.fourier_dim, s.latent_dim)
        else:
            self.omic_tokenizer = None
        self.type_embedding = nn.Parameter(torch.randn(2, s.latent_dim) * 0.02)
        self.latents = nn.Parameter(torch.randn(s.n_latents, s.latent_dim))
        self.layers = nn.ModuleList(
            nn.ModuleDict({"cross": s.cross_block(s.latent_dim), "self": s.self_blocks()})
            for _ in range(s.n_unique_layers)
        )
        self.layer_map = s.layer_map()
        self.head = nn.Sequential(nn.LayerNorm(s.latent_dim), nn.Linear(s.latent_dim, n_bins))

    def forward(
        self,
        wsi: Tensor | None,
        wsi_mask: Tensor | None,
        omics: Tensor | None,
        has_wsi: Tensor,
        has_omics: Tensor,
        return_attention: bool = False,
        wsi_coords: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, list[Tensor]]]:
        """Hazard logits; attention split back into ``wsi`` and ``omics`` parts per layer."""
        s = self.settings
        batch = has_wsi.shape[0]
        tokens: list[Tensor] = []
        masks: list[Tensor] = []
        sizes: dict[str, int] = {}
        if self.wsi_proj is not None and wsi is not None and wsi.shape[1] > 0:
            x = wsi.float()
            mask = _real_tokens(wsi_mask, wsi)
            if s.fourier_encode:
                if wsi_coords is None:
                    raise ValueError("fourier_encode needs wsi_coords")
                pos = normalise_coords(wsi_coords, mask)
                x = torch.cat([x, fourier_features(pos, s.num_freq_bands, s.max_freq)], dim=-1)
            tokens.append(self.wsi_proj(x) + self.type_embedding[0])
            masks.append(mask & has_wsi.bool()[:, None])
            sizes["wsi"] = x.shape[1]
        if self.omic_tokenizer is not None and omics is not None:
            x = self.omic_tokenizer(omics.float())
            if s.fourier_encode:
                pos = torch.linspace(-1, 1, x.shape[1], device=x.device).unsqueeze(-1)
                feats = fourier_features(pos, s.num_freq_bands, s.max_freq)
                x = torch.cat([x, feats.expand(batch, -1, -1)], dim=-1)
            tokens.append(self.omic_proj(x) + self.type_embedding[1])
            masks.append(has_omics.bool()[:, None].expand(-1, x.shape[1]))
            sizes["omics"] = x.shape[1]
        if not tokens:
            raise ValueError("the Perceiver got no input tokens")
        context = torch.cat(tokens, dim=1)
        mask = torch.cat(masks, dim=1)
        mask = mask | ~mask.any(dim=1, keepdim=True)  # no modality at all: finite output, imputed by caller
        latents = self.latents.unsqueeze(0).expand(batch, -1, -1)
        attention: dict[str, list[Tensor]] = {m: [] for m in sizes}
        for i in self.layer_map:
            layer = self.layers[i]
            latents, attn = layer["cross"](latents, context, mask)
            for block in layer["self"]:
                latents = block(latents)
            if return_attention:
                parts = torch.split(attn, list(sizes.values()), dim=-1)
                for m, part in zip(sizes, parts, strict=True):
                    attention[m].append(part)
        logits = self.head(latents.mean(dim=1))
        return (logits, attention) if return_attention else logits

    def l1_penalty(self) -> Tensor:
        """L1 norm of the omic tokenizer's input projection."""
        if self.omic_tokenizer is None:
            return self.latents.new_zeros(())
        return self.omic_tokenizer.l1_penalty()


class LateFusion(nn.Module):
    """SNN (omics) and gated ABMIL (WSI) hazard logits, fused by a learned linear layer.

    With both modalities the fused logits are ``W [snn, abmil] + b`` (initialised to their average);
    with one, that branch's logits (the average of what is available).
    """

    def __init__(
        self,
        *,
        wsi_dim: int | None,
        n_omics: int | None,
        n_bins: int,
        hidden: int,
        dropout: float,
    ) -> None:
        super().__init__()
        if wsi_dim is None and n_omics is None:
            raise ValueError("late fusion needs at least one modality")
        self.snn = SNN(n_omics=n_omics, n_bins=n_bins, hidden=hidden, dropout=dropout) if n_omics else None
        self.abmil = (
            GatedABMIL(wsi_dim=wsi_dim, n_bins=n_bins, hidden=hidden, dropout=dropout) if wsi_dim else None
        )
        self.fuse = nn.Linear(2 * n_bins, n_bins)
        with torch.no_grad():
            eye = torch.eye(n_bins) / 2
            self.fuse.weight.copy_(torch.cat([eye, eye], dim=1))
            self.fuse.bias.zero_()

    def forward(
        self,
        wsi: Tensor | None,
        wsi_mask: Tensor | None,
        omics: Tensor | None,
        has_wsi: Tensor,
        has_omics: Tensor,
        return_attention: bool = False,
        wsi_coords: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, list[Tensor]]]:
        """Fused hazard logits; attention is the ABMIL branch's."""
        has_w = has_wsi.bool()
        has_o = has_omics.bool()
        attention: dict[str, list[Tensor]] = {}
        lo = lw = None
        if self.snn is not None and omics is not None:
            lo = self.snn(None, None, omics, has_wsi, has_omics)
        if self.abmil is not None and wsi is not None and wsi.shape[1] > 0:
            lw, attention = self.abmil(wsi, wsi_mask, None, has_wsi, has_omics, return_attention=True)
            if wsi_mask is not None:
                has_w = has_w & wsi_mask.any(dim=1)
        if lo is None and lw is None:
            raise ValueError("late fusion got no input")
        if lo is None:
            logits = lw
        elif lw is None:
            logits = lo
        else:
            both = self.fuse(torch.cat([lo, lw], dim=-1))
            only = torch.where(has_o[:, None], lo, lw)
            logits = torch.where((has_o & has_w)[:, None], both, only)
        return (logits, attention) if return_attention else logits

    def l1_penalty(self) -> Tensor:
        """L1 norm of the SNN branch's input layer."""
        return self.snn.l1_penalty() if self.snn is not None else self.fuse.weight.new_zeros(())


def model_spec(
    name: str,
    *,
    n_bins: int,
    wsi_dim: int | None,
    n_omics: int | None,
    omic_groups: Sequence[tuple[str, int]] | None,
    healnet: HealnetSettings,
    training: TrainingSettings,
) -> dict[str, Any]:
    """The JSON-able spec that :func:`build_model` turns into a model (stored in every checkpoint).

    Inputs a model does not read are dropped (``wsi_dim`` for the SNN, ``n_omics`` for ABMIL). HEALNet
    and the Perceiver take the ``healnet`` settings, the other models the baseline width and dropout
    of ``training``.
    """
    if name not in MODEL_MODALITIES:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODEL_MODALITIES)}")
    mods = MODEL_MODALITIES[name]
    wsi_dim = wsi_dim if "wsi" in mods else None
    n_omics = n_omics if "omics" in mods else None
    base = {"hidden": training.baseline_hidden, "dropout": training.baseline_dropout}
    if name in READS_HEALNET_SETTINGS:
        kwargs: dict[str, Any] = {k: getattr(healnet, k) for k in LATENT_KEYS}
        kwargs.update(
            wsi_dim=wsi_dim,
            n_omics=n_omics,
            n_bins=n_bins,
            omic_groups=[[str(g), int(n)] for g, n in (omic_groups or [])] or None,
        )
    elif name == "coxph":
        kwargs = {"wsi_dim": wsi_dim, "n_omics": n_omics, "n_bins": n_bins,
                  "components": training.cox_components, "penalty": training.cox_penalty}
    elif name == "snn":
        kwargs = {"n_omics": n_omics, "n_bins": n_bins, **base}
    elif name == "abmil":
        kwargs = {"wsi_dim": wsi_dim, "n_bins": n_bins, **base}
    else:
        kwargs = {"wsi_dim": wsi_dim, "n_omics": n_omics, "n_bins": n_bins, **base}
    return {"name": name, "kwargs": kwargs}


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Instantiate the model a :func:`model_spec` describes (weights freshly initialised); a spec with
    ``members`` > 1 (a trained seed ensemble's checkpoint) gives a :class:`SeedEnsemble` of them."""
    if spec.get("members", 1) > 1:
        return SeedEnsemble([build_model({**spec, "members": 1}) for _ in range(spec["members"])])
    kwargs = dict(spec["kwargs"])
    if kwargs.get("omic_groups"):
        kwargs["omic_groups"] = [(str(g), int(n)) for g, n in kwargs["omic_groups"]]
    classes = {
        "healnet": HEALNet,
        "snn": SNN,
        "abmil": GatedABMIL,
        "perceiver": EarlyFusionPerceiver,
        "late_fusion": LateFusion,
        "coxph": CoxPH,
    }
    return classes[spec["name"]](**kwargs)
