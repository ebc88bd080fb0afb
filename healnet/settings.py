"""The validated config as typed, frozen settings: what training learns from, and how a run goes.

:func:`healnet.config.load_config` reads and checks a config file against the workflow's JSON schema,
which fills in every default; this module turns the sections training reads into dataclasses. They
hold no defaults of their own: the schema's are the only ones, so a value missing here is a bug, not
a silent fallback.

The ``training:`` section of a config file mixes two kinds of setting, split apart here:
:class:`TrainingSettings` change what a model learns; :class:`RunSettings` only change how fast a run
goes or where it runs (the reasons are given on the class). Only the former make up the workflow's
training snapshot, a saved state's fingerprint and the same-run check of ``healnet collect``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from healnet.config import load_config
from healnet.modalities import READS_HEALNET_SETTINGS, uses_training_setting


@dataclass(frozen=True)
class TrainingSettings:
    """The ``training:`` settings that change what a model learns (schema order)."""

    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    grad_accumulation: int
    max_patches_train: int
    early_stopping: bool
    average_last_epochs: int
    ensemble: int
    inner_val_fraction: float
    patience: int
    alpha: float
    bin_weights: bool
    l1_omics: float
    modality_dropout: float
    omic_max_features: int | None
    omic_select_by: str
    baseline_hidden: int
    baseline_dropout: float
    cox_penalty: float
    cox_components: int
    search: dict[str, list[Any]] | None
    search_folds: int
    seed: int


@dataclass(frozen=True)
class RunSettings:
    """The ``training:`` settings that change how fast a fold trains, or where, not what it learns.

    Readers (``workers``: bags are drawn from seeds made in the main process and the bag loader keeps
    its own random generator), ``threads`` (another thread count only reorders float sums, so a
    retrained model may differ in the last digits), how often an unfinished fold saves its state (a
    resumed fold gives the same numbers), where decoded features are cached and whether bags stay in
    the device's memory (the same values, read faster), and the ``device`` word (a saved state's
    fingerprint records the resolved device type instead). The workflow keeps them out of the
    training snapshot, so changing them retrains nothing, except the device: the workflow's train
    rule passes it as a param, as a GPU and a CPU give different last digits. ``healnet train``'s
    command-line flags override them.
    """

    workers: int | str
    threads: int
    save_state_minutes: int
    feature_cache: str | None
    bags_on_device: bool | str
    device: str


@dataclass(frozen=True)
class HealnetSettings:
    """The ``healnet:`` section: the shape of HEALNet and the early-fusion Perceiver (schema order)."""

    depth: int
    n_latents: int
    latent_dim: int
    cross_heads: int
    cross_dim_head: int
    latent_heads: int
    latent_dim_head: int
    self_per_cross_attn: int
    weight_sharing: bool
    fourier_encode: bool
    num_freq_bands: int
    max_freq: float
    attn_dropout: float
    ff_dropout: float
    snn_feedforward: bool
    omic_tokens: str
    omic_token_dim: int
    omic_chunk_size: int


@dataclass(frozen=True)
class Settings:
    """Everything ``healnet train`` reads from a config: the learning settings, the HEALNet shape, the
    number of survival time bins (``omics.n_bins``) and the run settings."""

    training: TrainingSettings
    healnet: HealnetSettings
    n_bins: int
    run: RunSettings


def _section(cls: type, values: dict[str, Any]) -> Any:
    """``cls`` built from the keys of ``values`` that are its fields (a validated section has them all)."""
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})


def settings_from_config(config: dict[str, Any]) -> Settings:
    """The typed settings of a validated config (:func:`healnet.config.validate_config`'s result)."""
    return Settings(
        training=_section(TrainingSettings, config["training"]),
        healnet=_section(HealnetSettings, config["healnet"]),
        n_bins=int(config["omics"]["n_bins"]),
        run=_section(RunSettings, config["training"]),
    )


def load_settings(path: str | Path) -> Settings:
    """Read, validate (defaults filled in by the schema) and type a config file."""
    return settings_from_config(load_config(path))


def training_snapshot(config: dict[str, Any], cohort: str, model: str) -> dict[str, Any]:
    """The settings ``model`` is trained with on ``cohort``, as a config that ``healnet train`` loads.

    Only what can change what this model learns is in it: the cohort's entry, the number of time
    bins, the learning settings this model uses (:func:`healnet.modalities.uses_training_setting`)
    and, for the models built from it, the ``healnet:`` section. Run settings and the report's are
    left out, so the workflow, which reruns a model's training when its snapshot's text changes,
    retrains nothing when only they change. ``config``: a validated config (defaults filled in).
    """
    settings = settings_from_config(config)
    training = {
        key: value for key, value in dataclasses.asdict(settings.training).items()
        if uses_training_setting(model, key)
    }
    snapshot: dict[str, Any] = {
        "cohorts": {cohort: config["cohorts"][cohort]},
        "omics": {"n_bins": settings.n_bins},  # training fits its own bins: it needs the count
        "training": training,
    }
    if model in READS_HEALNET_SETTINGS:
        snapshot["healnet"] = dataclasses.asdict(settings.healnet)
    return snapshot
