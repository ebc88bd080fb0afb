"""Seed ensembles: several copies of one model, each trained from its own seed, scored as one.

At tens of deaths per training fold, the training seed alone (initial weights, patch draws, dropout,
modality dropout) moves a model's c-index by several hundredths. Averaging members trained from
different seeds narrows that spread. The members' survival curves are averaged, not their
logits or risks: the ensemble's curve is then a proper survival function, its risk (``-sum S``) is
the members' mean risk, and its Brier score is that of the mean curve.

:class:`SeedEnsemble` returns hazard logits like every other model (those whose survival curve is
the members' mean curve), so training, scoring, checkpoints and the report treat it as one model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from healnet.models.loss import survival_from_logits


def fold_seed(training_seed: int, fold: int, member: int = 0) -> int:
    """The seed that trains member ``member`` of fold ``fold``: the seed a single run with
    ``training.seed + member`` gives that fold, so every member can be checked as a single run
    (with early stopping off; on, the members share member 0's inner validation split)."""
    return (training_seed + member) * 1000 + fold


def logits_from_survival(survival: Tensor, eps: float = 1e-6) -> Tensor:
    """Hazard logits whose :func:`survival_from_logits` is ``survival`` (``[B, n_bins]``, non-increasing).

    ``h_k = 1 - S_k / S_{k-1}`` with ``S_{-1} = 1``; hazards are clipped to ``[eps, 1 - eps]`` so every
    logit is finite.
    """
    before = torch.cat([torch.ones_like(survival[:, :1]), survival[:, :-1]], dim=-1)
    hazard = (1 - survival / before.clamp_min(eps)).clamp(eps, 1 - eps)
    return torch.logit(hazard)


class SeedEnsemble(nn.Module):
    """Members of one architecture; the forward pass has the members' call signature. It is only
    scored: each member is trained on its own (with its own ``l1_penalty``) before they are joined.

    Attention maps (``return_attention``) are averaged over the members, layer by layer.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError("a seed ensemble needs at least two members")
        self.members = nn.ModuleList(members)

    @property
    def omic_tokenizer(self) -> nn.Module:
        """The first member's omic tokenizer (all members share its token layout), for reports."""
        return self.members[0].omic_tokenizer

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
        """Hazard logits of the members' mean survival curve (and the mean attention maps)."""
        inputs = (wsi, wsi_mask, omics, has_wsi, has_omics)
        outputs = [m(*inputs, return_attention=return_attention, wsi_coords=wsi_coords) for m in self.members]
        logits = [o[0] for o in outputs] if return_attention else outputs
        survival = torch.stack([survival_from_logits(x.float()) for x in logits]).mean(dim=0)
        mean_logits = logits_from_survival(survival)
        if not return_attention:
            return mean_logits
        attention = {}
        for modality in outputs[0][1]:
            per_layer = zip(*(o[1][modality] for o in outputs), strict=True)
            attention[modality] = [torch.stack(maps).mean(dim=0) for maps in per_layer]
        return mean_logits, attention
