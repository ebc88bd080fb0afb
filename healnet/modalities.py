"""Which inputs each model of the harness reads, and which config sections shape it.

Kept apart from the model code (no torch import), so that the workflow and the summary step can ask
which models are multimodal without paying for torch.
"""

from __future__ import annotations

MODEL_MODALITIES: dict[str, frozenset[str]] = {
    "healnet": frozenset({"wsi", "omics"}),
    "snn": frozenset({"omics"}),
    "abmil": frozenset({"wsi"}),
    "perceiver": frozenset({"wsi", "omics"}),
    "late_fusion": frozenset({"wsi", "omics"}),
    "coxph": frozenset({"wsi", "omics"}),
}
MULTIMODAL = frozenset(name for name, mods in MODEL_MODALITIES.items() if len(mods) == 2)
WSI_ONLY = frozenset(name for name, mods in MODEL_MODALITIES.items() if mods == {"wsi"})
# Models built from the `healnet:` config section (latent array, attention, omic tokens); the others
# ignore it, so the workflow does not retrain them when it changes.
READS_HEALNET_SETTINGS = frozenset({"healnet", "perceiver"})
# Training settings only multimodal models use.
MULTIMODAL_TRAINING_SETTINGS = frozenset({"modality_dropout"})
# Training settings only models that read omics use (the feature screen, the L1 on the omic input),
# only models that read slides use (patches drawn per bag), and only the models not built from the
# `healnet:` section use (the SNN's and ABMIL's width and dropout).
OMIC_TRAINING_SETTINGS = frozenset({"omic_max_features", "omic_select_by", "l1_omics"})
WSI_TRAINING_SETTINGS = frozenset({"max_patches_train"})
BASELINE_TRAINING_SETTINGS = frozenset({"baseline_hidden", "baseline_dropout"})
# Models fitted in closed form, not by gradient steps (the penalised Cox model): of the training
# settings they read only the omic screen and their own.
LINEAR_MODELS = frozenset({"coxph"})
COX_TRAINING_SETTINGS = frozenset({"cox_penalty", "cox_components"})


def uses_training_setting(model: str, key: str) -> bool:
    """Whether the training setting ``key`` can change what ``model`` learns (unknown keys: yes, except
    for the closed-form models, which read only what they are known to read)."""
    modalities = MODEL_MODALITIES[model]
    if model in LINEAR_MODELS:
        return key in COX_TRAINING_SETTINGS or key in {"omic_max_features", "omic_select_by"}
    return not (
        key in COX_TRAINING_SETTINGS
        or (key in MULTIMODAL_TRAINING_SETTINGS and model not in MULTIMODAL)
        or (key in OMIC_TRAINING_SETTINGS and "omics" not in modalities)
        or (key in WSI_TRAINING_SETTINGS and "wsi" not in modalities)
        or (key in BASELINE_TRAINING_SETTINGS and model in READS_HEALNET_SETTINGS)
    )
