"""HEALNet and the baselines: per-sample missing modalities, padding invariance, attention, options."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from healnet.config import validate_config
from healnet.modalities import LINEAR_MODELS, MODEL_MODALITIES
from healnet.models.baselines import build_model, model_spec
from healnet.models.healnet import LATENT_KEYS, HEALNet, LatentSettings
from healnet.settings import settings_from_config

D, F_RNA, F_CNV = 24, 12, 8
GROUPS = [("rna", F_RNA), ("cnv", F_CNV)]

# the schema's defaults: every setting a model spec reads
DEFAULTS = settings_from_config(validate_config({"cohorts": {"X": {"demo": True}}}))
SETTINGS = {"healnet": DEFAULTS.healnet, "training": DEFAULTS.training}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_batch(seed: int = 0, batch: int = 4, n: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[1, 5:] = False  # a shorter bag, padded
    return {
        "wsi": torch.randn(batch, n, D, generator=g),
        "wsi_mask": mask,
        "coords": torch.randint(0, 5000, (batch, n, 2), generator=g).float(),
        "omics": torch.randn(batch, F_RNA + F_CNV, generator=g),
        "has_wsi": torch.tensor([True, True, False, True]),
        "has_omics": torch.tensor([True, False, True, True]),
    }


def healnet(**kwargs: object) -> HEALNet:
    torch.manual_seed(0)
    return HEALNet(wsi_dim=D, n_omics=F_RNA + F_CNV, omic_groups=GROUPS, **kwargs).eval()


def run(model: torch.nn.Module, b: dict[str, torch.Tensor], **kw: object) -> torch.Tensor:
    return model(
        b["wsi"], b["wsi_mask"], b["omics"], b["has_wsi"], b["has_omics"], wsi_coords=b["coords"], **kw
    )


@pytest.mark.parametrize("tokens", ["gene", "modality", "chunk", "single"])
@pytest.mark.parametrize("fourier", [False, True])
def test_missing_wsi_in_a_mixed_batch_equals_the_sample_alone_without_wsi(tokens: str, fourier: bool) -> None:
    model = healnet(omic_tokens=tokens, fourier_encode=fourier, omic_chunk_size=6)
    b = make_batch()
    with torch.no_grad():
        mixed = run(model, b)
        alone = model(None, None, b["omics"][2:3], torch.tensor([False]), torch.tensor([True]))
        # and the other way round: sample 1 has no omics
        alone_wsi = model(
            b["wsi"][1:2, :5],
            None,
            None,
            torch.tensor([True]),
            torch.tensor([False]),
            wsi_coords=b["coords"][1:2, :5],
        )
    torch.testing.assert_close(mixed[2], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], alone_wsi[0], atol=1e-5, rtol=1e-5)
    # the WSI really matters for samples that have it
    with torch.no_grad():
        no_wsi = model(None, None, b["omics"][0:1], torch.tensor([False]), torch.tensor([True]))
    assert (mixed[0] - no_wsi[0]).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(MODEL_MODALITIES))
def test_padding_tokens_do_not_change_outputs(name: str) -> None:
    spec = model_spec(
        name,
        n_bins=4,
        wsi_dim=D,
        n_omics=F_RNA + F_CNV,
        omic_groups=GROUPS,
        healnet=replace(DEFAULTS.healnet, fourier_encode=True),
        training=DEFAULTS.training,
    )
    torch.manual_seed(0)
    model = build_model(spec).eval()
    b = make_batch()
    padded = dict(b)
    extra = 7
    padded["wsi"] = torch.cat([b["wsi"], 100 * torch.randn(4, extra, D)], dim=1)
    padded["coords"] = torch.cat([b["coords"], torch.full((4, extra, 2), 1e6)], dim=1)
    padded["wsi_mask"] = torch.cat([b["wsi_mask"], torch.zeros(4, extra, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(run(model, b), run(model, padded), atol=1e-5, rtol=1e-5)


def test_attention_is_returned_per_layer_and_modality_and_respects_masks() -> None:
    model = healnet(depth=3, cross_heads=2, omic_tokens="gene")
    b = make_batch()
    with torch.no_grad():
        logits, attn = run(model, b, return_attention=True)
    assert logits.shape == (4, 4)
    assert set(attn) == {"wsi", "omics"} and len(attn["wsi"]) == 3 and len(attn["omics"]) == 3
    wsi = attn["wsi"][0]
    assert wsi.shape == (4, 2, 16, 9)
    assert attn["omics"][0].shape == (4, 2, 16, F_RNA + F_CNV)  # gene tokens: one per feature
    torch.testing.assert_close(wsi[0].sum(-1), torch.ones(2, 16))  # a distribution over patches
    assert wsi[1, ..., 5:].abs().max() == 0  # padding gets no attention
    assert wsi[2].abs().max() == 0  # sample without a slide: no WSI attention
    assert attn["omics"][0][1].abs().max() == 0  # sample without omics


def test_weight_sharing_ties_layers_after_the_first() -> None:
    free = healnet(depth=3, weight_sharing=False)
    tied = healnet(depth=3, weight_sharing=True)
    two = healnet(depth=2, weight_sharing=False)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(tied) == count(two) < count(free)
    assert tied.layer_map == [0, 1, 1]


@pytest.mark.parametrize("name", ["healnet", "perceiver"])
def test_latent_settings_are_keywords_with_one_set_of_defaults(name: str) -> None:
    spec = model_spec(
        name,
        n_bins=4,
        wsi_dim=D,
        n_omics=None,
        omic_groups=None,
        healnet=replace(DEFAULTS.healnet, depth=3),
        training=DEFAULTS.training,
    )
    assert set(spec["kwargs"]) == {*LATENT_KEYS, "wsi_dim", "n_omics", "n_bins", "omic_groups"}
    model = build_model(spec)
    assert model.settings == LatentSettings(depth=3)
    with pytest.raises(TypeError, match="dept"):
        build_model({"name": name, "kwargs": {**spec["kwargs"], "dept": 3}})


def test_no_self_attention_and_snn_feedforward_options_run() -> None:
    model = healnet(self_per_cross_attn=0, snn_feedforward=True)
    assert not any(isinstance(m, torch.nn.GELU) for m in model.modules())
    assert any(isinstance(m, torch.nn.AlphaDropout) for m in model.modules())
    with torch.no_grad():
        assert torch.isfinite(run(model, make_batch())).all()


@pytest.mark.parametrize("tokens", ["gene", "modality", "chunk", "single"])
def test_l1_penalty_is_the_omic_input_projection_norm(tokens: str) -> None:
    model = healnet(omic_tokens=tokens, omic_chunk_size=6)
    penalty = model.l1_penalty()
    penalty.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(n.startswith("omic_tokenizer.") for n in with_grad)
    assert penalty.item() > 0


@pytest.mark.parametrize("name", sorted(set(MODEL_MODALITIES) - LINEAR_MODELS))  # coxph: no gradient steps
def test_every_model_trains_a_step_with_mixed_missingness(name: str) -> None:
    spec = model_spec(
        name, n_bins=4, wsi_dim=D, n_omics=F_RNA + F_CNV, omic_groups=GROUPS, **SETTINGS
    )
    model = build_model(spec).train()
    b = make_batch()
    b["wsi_mask"][2] = False  # sample 2 has no patches at all
    logits = run(model, b)
    loss = logits.square().mean() + 1e-4 * model.l1_penalty()
    loss.backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_late_fusion_uses_the_available_branch_when_a_modality_is_missing() -> None:
    spec = model_spec(
        "late_fusion",
        n_bins=4,
        wsi_dim=D,
        n_omics=F_RNA + F_CNV,
        omic_groups=GROUPS,
        **SETTINGS,
    )
    torch.manual_seed(0)
    model = build_model(spec).eval()
    b = make_batch()
    with torch.no_grad():
        fused = run(model, b)
        snn = model.snn(None, None, b["omics"], b["has_wsi"], b["has_omics"])
        abmil = model.abmil(b["wsi"], b["wsi_mask"], None, b["has_wsi"], b["has_omics"])
    torch.testing.assert_close(fused[2], snn[2])  # no WSI: the omic branch
    torch.testing.assert_close(fused[1], abmil[1])  # no omics: the WSI branch
    torch.testing.assert_close(fused[0], (snn[0] + abmil[0]) / 2)  # both: initialised to the average


def test_unimodal_specs_drop_the_other_modality() -> None:
    snn = model_spec("snn", n_bins=4, wsi_dim=D, n_omics=5, omic_groups=None, **SETTINGS)
    abmil = model_spec(
        "abmil", n_bins=4, wsi_dim=D, n_omics=5, omic_groups=None, **SETTINGS
    )
    assert (
        "wsi_dim" not in snn["kwargs"]
        and abmil["kwargs"]["wsi_dim"] == D
        and "n_omics" not in abmil["kwargs"]
    )
    with pytest.raises(ValueError, match="unknown model"):
        model_spec("mcat", n_bins=4, wsi_dim=D, n_omics=5, omic_groups=None, **SETTINGS)


@pytest.mark.parametrize("tokens", ["gene", "modality"])
def test_omic_attribution_is_the_risk_gradient_times_the_input(tokens: str) -> None:
    """The report ranks genes by this number: it must be d(risk)/d(x_j) * x_j with the slide absent."""
    from healnet.models.loss import risk_from_logits
    from healnet.report.attention import omic_attribution

    model = healnet(omic_tokens=tokens)
    x = make_batch()["omics"][0].numpy()

    def risk(values: torch.Tensor) -> float:
        with torch.no_grad():
            logits = model(None, None, values[None], torch.tensor([False]), torch.tensor([True]))
        return float(risk_from_logits(logits).sum())

    got = omic_attribution(model, x)
    # central differences in float32: a step large against rounding, a tolerance to match
    eps, base, step = 1e-2, torch.from_numpy(x), torch.eye(len(x))
    slopes = [(risk(base + eps * step[j]) - risk(base - eps * step[j])) / (2 * eps) for j in range(len(x))]
    expected = [slope * value for slope, value in zip(slopes, x, strict=True)]
    assert got.shape == x.shape
    assert got == pytest.approx(expected, rel=0.02, abs=2e-5)


def test_survival_to_logits_and_back_is_exact() -> None:
    from healnet.models.ensemble import logits_from_survival
    from healnet.models.loss import survival_from_logits

    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    survival = survival_from_logits(logits)
    torch.testing.assert_close(logits_from_survival(survival), logits)


@pytest.mark.parametrize("name", sorted(set(MODEL_MODALITIES) - LINEAR_MODELS))  # coxph: never an ensemble
def test_a_seed_ensemble_scores_the_mean_survival_curve_of_its_members(name: str) -> None:
    from healnet.models.ensemble import SeedEnsemble
    from healnet.models.loss import risk_from_logits, survival_from_logits

    spec = model_spec(name, n_bins=4, wsi_dim=D, n_omics=F_RNA + F_CNV, omic_groups=GROUPS,
                      healnet=replace(DEFAULTS.healnet, n_latents=8, latent_dim=16),
                      training=DEFAULTS.training)
    torch.manual_seed(0)
    ensemble = build_model({**spec, "members": 3}).eval()
    assert isinstance(ensemble, SeedEnsemble) and len(ensemble.members) == 3
    b = make_batch()
    with torch.no_grad():
        outputs = [run(m, b, return_attention=True) for m in ensemble.members]
        logits, attention = run(ensemble, b, return_attention=True)
    members = [logits for logits, _ in outputs]
    assert len({round(float(risk_from_logits(m).sum()), 6) for m in members}) == 3  # members differ
    mean_curve = torch.stack([survival_from_logits(m) for m in members]).mean(0)
    torch.testing.assert_close(survival_from_logits(logits), mean_curve, atol=1e-5, rtol=1e-5)
    # its risk (-sum of survival) is the members' mean risk
    mean_risk = torch.stack([risk_from_logits(m) for m in members]).mean(0)
    torch.testing.assert_close(risk_from_logits(logits), mean_risk, atol=1e-5, rtol=1e-5)
    # attention maps, for the report: the members' mean, layer by layer
    assert set(attention) == set(outputs[0][1])
    for modality, layers in attention.items():
        for i, layer in enumerate(layers):
            torch.testing.assert_close(layer, torch.stack([att[modality][i] for _, att in outputs]).mean(0))
