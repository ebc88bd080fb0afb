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
}
MULTIMODAL = frozenset(name for name, mods in MODEL_MODALITIES.items() if len(mods) == 2)
WSI_ONLY = frozenset(name for name, mods in MODEL_MODALITIES.items() if mods == {"wsi"})
# Models built from the `healnet:` config section (latent array, attention, omic tokens); the others
# ignore it, so the workflow does not retrain them when it changes.
READS_HEALNET_SETTINGS = frozenset({"healnet", "perceiver"})
# Training settings only multimodal models use.
MULTIMODAL_TRAINING_SETTINGS = frozenset({"modality_dropout"})
