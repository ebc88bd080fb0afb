# Shared helpers: where each cohort's slides are, how many folds, which models, the healnet command,
# and where outputs go.
import functools
import json
import math
import os
import re
import shlex
import sys
from pathlib import Path

from snakemake_interface_executor_plugins.settings import DeploymentMethod

# Each step runs `healnet <step>` as `python -m healnet.cli <step>`. The python is that of the job's
# conda environment under --sdm conda, else the interpreter running Snakemake (the project's .venv).
# PYTHONPATH makes this repository's two packages importable in conda environments and cluster jobs.
# (The Snakefile has already put BASEDIR on sys.path, before validating the config.)
BASEDIR = Path(workflow.basedir).resolve()
_USES_CONDA = DeploymentMethod.CONDA in (workflow.deployment_settings.deployment_method or ())
_PYTHON = "python" if _USES_CONDA else sys.executable
HEALNET = f"PYTHONPATH={shlex.quote(str(BASEDIR))} {shlex.quote(_PYTHON)} -m healnet.cli"
from healnet.config import BAGS_ON_DEVICE_SETTING_WORDS, configured_encoders, encoder_weights, tiles_geometry
from healnet.data.results import NO_ENCODER
from healnet.modalities import LINEAR_MODELS, MODEL_MODALITIES
from healnet.settings import training_snapshot
from healnet.modalities import WSI_ONLY as WSI_ONLY_MODELS
from preprocessing.slides.files import SlideFolderError, find_slide_files
from preprocessing.tiling.tiles import parse_geometry

# Every file the workflow writes lies under config `outdir` (logs and rule benchmarks included), so a
# run can be pointed at scratch storage and archived or deleted as one folder. Each rule's log is
# logs/{rule}/... and its benchmark benchmarks/{rule}/..., named after the rule and so after the
# `healnet` subcommand it runs.
OUTDIR = os.path.normpath(config["outdir"])

# The encoders features are extracted with (extract.encoders, else extract.encoder). Every model that
# reads slides is trained on each; models that read no slides once, under the encoder folder `none`.
# The first encoder's tiles decide which slides the omics step counts as usable, and its HEALNet is
# the one the report draws.
ENCODERS = configured_encoders(config["extract"])
ENCODER_WEIGHTS = {e: encoder_weights(config["extract"], e) for e in ENCODERS}


def out(path):
    """``path`` (relative, may hold wildcards) under the output folder."""
    return path if OUTDIR == "." else f"{OUTDIR}/{path}"


def cohort_config(cohort):
    return config["cohorts"][cohort]


def is_demo(cohort):
    return bool(cohort_config(cohort).get("demo", False))


def imported(cohort):
    """The cohort's `features:` entry (CLAM or TRIDENT files imported instead of extracting), or None."""
    return cohort_config(cohort).get("features")


def cohort_encoders(cohort):
    """The encoders of a cohort's feature stores: the imported files' encoder, else the configured ones."""
    return [imported(cohort)["encoder"]] if imported(cohort) else ENCODERS


def primary_encoder(cohort):
    return cohort_encoders(cohort)[0]


def name_pattern(names):
    """A wildcard pattern that matches exactly these names (none: nothing)."""
    return "|".join(re.escape(n) for n in names) if names else "(?!)"


# Cohorts whose stores are imported (rule import_features) and those whose slides are tiled and
# extracted: rule-level wildcard constraints keep the two ways of making a store apart.
IMPORTED_COHORTS = [c for c in config["cohorts"] if imported(c)]
EXTRACTED_COHORTS = [c for c in config["cohorts"] if not imported(c)]


def slides_dir(cohort):
    if is_demo(cohort):
        return out(f"data/{cohort}/slides")
    return cohort_config(cohort).get("slides")


def omics_source(cohort):
    if is_demo(cohort):
        return out(f"data/{cohort}/omics")
    return cohort_config(cohort).get("omics")


def demo_plan(cohort):
    from preprocessing.demo.cohort import plan_cohort

    d = config["demo"]
    return plan_cohort(d["patients"], d["seed"], d["long_side_px"], d["corrupt_slides"])


@functools.cache
def cohort_slides(cohort):
    """Slide stem -> slide path, known when the DAG is built (demo slide names come from the seed).

    Listed once per cohort and Snakemake process: every tile and extract job asks for it while the
    DAG is built, and listing a 1,000-slide folder per job made building that DAG quadratic (44 s
    for 1,000 slides). Callers must not modify the returned dict.
    """
    folder = slides_dir(cohort)
    if imported(cohort):
        source = Path(imported(cohort)["path"])
        if not source.is_dir():
            raise ValueError(f"cohort {cohort}, features path {source}: not a folder")
        return {p.stem: str(p) for p in sorted(source.glob("*.h5"))}
    if is_demo(cohort):
        from preprocessing.demo.cohort import slide_files

        return {Path(n).stem: str(Path(folder) / n) for n in slide_files(demo_plan(cohort))}
    if not folder:
        return {}
    try:
        return {stem: str(path) for stem, path in find_slide_files(folder).items()}
    except SlideFolderError as err:
        raise ValueError(f"cohort {cohort}, slides folder {folder}: {err}") from None


def slide_path(wildcards):
    slides = cohort_slides(wildcards.cohort)
    if wildcards.slide not in slides:
        raise ValueError(f"cohort {wildcards.cohort} has no slide {wildcards.slide}")
    return slides[wildcards.slide]


def fold_ids(cohort):
    """Fold numbers: one per splits_{k}.csv when the cohort ships splits, else config omics.n_folds."""
    splits = cohort_config(cohort).get("splits")
    if splits:
        ks = sorted(int(p.stem.split("_")[-1]) for p in Path(splits).glob("splits_*.csv"))
        if not ks:
            raise ValueError(f"cohort {cohort}: no splits_*.csv in {splits}")
        return ks
    return list(range(config["omics"]["n_folds"]))


@functools.cache
def has_slides(cohort):
    return is_demo(cohort) or bool(cohort_config(cohort).get("slides")) or bool(imported(cohort))


@functools.cache
def cohort_models(cohort):
    """The configured models that can run on this cohort (no WSI-only model without slides: those
    are skipped, and Snakemake says so once when it starts). Callers must not modify the list."""
    skipped = [m for m in config["models"] if not has_slides(cohort) and m in WSI_ONLY_MODELS]
    if skipped:
        print(f"cohort {cohort} has no slides: {', '.join(skipped)} (slides only) is not trained for it",
              file=sys.stderr)
    return [m for m in config["models"] if m not in skipped]


def geometry_of(encoder):
    """The tiles folder of ``encoder``'s patch geometry, e.g. 224px_0.5mpp: encoders that cut the same
    patches share one tiling."""
    return tiles_geometry(config, encoder)


def tiles_dir(cohort, encoder=None):
    """The tiles folder of ``encoder`` (default: the cohort's primary one)."""
    return out(f"tiles/{cohort}/{geometry_of(encoder or primary_encoder(cohort))}")


def tiles_of(cohort, encoder=None):
    """The tiles files of a cohort's slides (none for imported features, which have no tiling)."""
    if imported(cohort):
        return []
    return [f"{tiles_dir(cohort, encoder)}/{s}.parquet" for s in cohort_slides(cohort)]


def stores_of(cohort, encoder):
    return [out(f"features/{cohort}/{encoder}/{s}.zarr") for s in cohort_slides(cohort)]


def reads_slides(model):
    return "wsi" in MODEL_MODALITIES.get(model, ())


@functools.cache
def cohort_runs(cohort):
    """(encoder, model) of every run of a cohort: each model that reads slides on each encoder's
    features, the others (and every model of a cohort without slides) under `none`."""
    return [(e, m) for m in cohort_models(cohort)
            for e in (cohort_encoders(cohort) if has_slides(cohort) and reads_slides(m) else [NO_ENCODER])]


def run_names(cohort):
    return [f"{e}/{m}" for e, m in cohort_runs(cohort)]


REPORT_FIGURES = ["km_curves.png", "c_index.png", "attention_wsi.png", "attention_omics.png"]


def final_outputs():
    """What `snakemake` with no target makes. The per-slide and per-fold files are named too: a job
    that failed or was killed has its outputs deleted, and Snakemake does not remake a missing input
    of a job whose own outputs exist, so without them a rerun after a killed fold or extraction said
    "Nothing to be done" and kept the joined results of the run before."""
    targets = []
    for cohort in config["cohorts"]:
        targets += [out(f"results/{cohort}/summary.{ext}") for ext in ("md", "csv", "html")]
        targets += [out(f"results/{cohort}/figures/{f}") for f in REPORT_FIGURES]
        targets += [out(f"results/{cohort}/failed_slides.csv")]
        for encoder in cohort_encoders(cohort):
            targets += tiles_of(cohort, encoder) + stores_of(cohort, encoder)
        targets += checkpoints_of(cohort, cohort_runs(cohort))
    return list(dict.fromkeys(targets))  # encoders with the same geometry share their tiles


def encoder_mem_mb(wildcards, cnn_mb):
    """Memory of an encoder or extraction job: ``cnn_mb`` for the CNNs, more for the registry's
    foundation models, whose weights alone take up to about 4.5 GB in float32 (ViT-giant)."""
    from preprocessing.features.registry import FOUNDATION

    return 16000 if wildcards.encoder in FOUNDATION else cnn_mb


def device_needs_gpu(section):
    return 0 if config[section]["device"] == "cpu" else 1


# ---- demo -------------------------------------------------------------------------------------
# Every demo cohort uses the `demo:` section, so its file names (from the seed) are the same for all.
DEMO_COHORTS = [c for c in config["cohorts"] if is_demo(c)]
DEMO_TABLES = ["clinical.tsv", "rna.tsv", "cnv.tsv", "mutations.maf"]


def demo_slide_names():
    from preprocessing.demo.cohort import slide_files

    return slide_files(demo_plan(DEMO_COHORTS[0])) if DEMO_COHORTS else []


# ---- omics ------------------------------------------------------------------------------------
def omics_inputs(wildcards):
    """The omics step reads the tiles (which slides are usable), the cohort's tables and its split
    files: all inputs, so that a corrected table or split file reruns it and what follows."""
    c = wildcards.cohort
    # which slides are usable: the primary encoder's tiles, or the imported stores
    inputs = {"tiles": tiles_of(c), "stores": stores_of(c, primary_encoder(c)) if imported(c) else []}
    if is_demo(c):
        inputs["plan"] = out(f"data/{c}/cohort.json")
        return inputs
    source = Path(str(omics_source(c)))
    inputs["tables"] = sorted(str(p) for p in source.iterdir() if p.is_file()) if source.is_dir() else [str(source)]
    splits = cohort_config(c).get("splits")
    inputs["splits"] = sorted(str(p) for p in Path(splits).glob("splits_*.csv")) if splits else []
    return inputs


def omics_args(wildcards):
    c = wildcards.cohort
    args = [f"--omics {shlex.quote(str(omics_source(c)))}"]
    if imported(c):
        args.append(f"--features-dir {shlex.quote(out(f'features/{c}/{primary_encoder(c)}'))}")
    elif slides_dir(c):
        tiles = shlex.quote(tiles_dir(c))
        args.append(f"--slides {shlex.quote(str(slides_dir(c)))} --tiles-dir {tiles}")
    if cohort_config(c).get("splits"):
        args.append(f"--splits {shlex.quote(cohort_config(c)['splits'])}")
    if config["omics"]["clinical_covariates"]:
        args.append("--clinical-covariates " + ",".join(config["omics"]["clinical_covariates"]))
    return " ".join(args)


# ---- train, evaluate, report -----------------------------------------------------------------
# Settings that change how fast a job runs, not what it writes, reach the commands as `threads` and
# `resources`, not as params or in the training snapshot, so that changing them reruns nothing:
# Snakemake reruns a job whose params or inputs change, after deleting its outputs. They are
# extract.workers and extract.batch_size (features do not depend on them), and the training
# run settings of healnet.settings.RunSettings (the reasons are given there).


def training_settings(wildcards):
    """The settings one model is trained with on one cohort (file + --config overrides, defaults
    filled in) as JSON: a change reruns that model's training, while a change elsewhere (report
    settings, run settings, HEALNet's shape for a model not built from it, the omic screen for a
    model that reads no omics) does not. healnet.settings.training_snapshot decides what is in it."""
    return json.dumps(training_snapshot(config, wildcards.cohort, wildcards.model), sort_keys=True)


def run_inputs(wildcards):
    """What a model's training reads on one cohort: its settings, the omic tables, the feature stores."""
    c, encoder, model = wildcards.cohort, wildcards.encoder, wildcards.model
    return {
        "config": out(f"results/{c}/{encoder}/{model}/config.json"),
        "manifest": out(f"omics/{c}/manifest.parquet"),
        "features": out(f"omics/{c}/features.parquet"),
        "splits": out(f"omics/{c}/splits.parquet"),
        # only models that read slides wait for (and retrain after) the feature stores
        "stores": stores_of(c, encoder) if encoder != NO_ENCODER and reads_slides(model) else [],
    }


# What the search and train jobs share: their request to a cluster, the run settings (see above), and
# the options that pass those on to `healnet search` / `healnet train`.
TRAINING_RESOURCES = {
    "mem_mb": 8000,
    "runtime": 240,
    "gpu": device_needs_gpu("training"),
    "readers": config["training"]["workers"],
    "save_state_minutes": config["training"]["save_state_minutes"],
    "feature_cache": config["training"]["feature_cache"] or "none",
    "bags_on_device": BAGS_ON_DEVICE_SETTING_WORDS[config["training"]["bags_on_device"]],
}
TRAINING_RUN_OPTIONS = (
    " --threads {threads} --workers {resources.readers} --save-state-minutes {resources.save_state_minutes}"
    " --feature-cache {resources.feature_cache:q} --bags-on-device {resources.bags_on_device}"
    " --device {params.device} > {log:q} 2>&1"
)


def search_size(model):
    """The number of candidates training.search gives each fold of `model` (0: no search, or a model
    fitted in closed form, which has nothing to search)."""
    search = config["training"].get("search") or {}
    return math.prod(len(values) for values in search.values()) if search and model not in LINEAR_MODELS else 0


def search_dir(wildcards):
    return out(f"results/{wildcards.cohort}/{wildcards.encoder}/{wildcards.model}/search")


def train_inputs(wildcards):
    """run_inputs, and the inner scores of every candidate of training.search on this fold (rule search)."""
    scores = [f"{search_dir(wildcards)}/fold{wildcards.fold}/setting{i}.json"
              for i in range(search_size(wildcards.model))]
    return run_inputs(wildcards) | {"search": scores}


def search_cost():
    """What training.search adds to a run, said once when it starts: jobs and inner fits."""
    per_fold = {m: search_size(m) for m in config["models"]}
    folds = sum(len(fold_ids(c)) * per_fold[m] for c in config["cohorts"] for _, m in cohort_runs(c))
    if folds:
        k = config["training"]["search_folds"]
        print(f"training.search: {folds} search jobs (a candidate on a fold each), {folds * k} inner fits "
              f"of {k} inner folds, before the folds are trained", file=sys.stderr)


def checkpoints_of(cohort, runs):
    return [out(f"models/{cohort}/{e}/{m}/fold{k}.pt") for e, m in runs for k in fold_ids(cohort)]


def fold_outputs(wildcards):
    """Every fold's outputs of one cohort x encoder x model (rule train), which `healnet collect` joins."""
    stem = out(f"results/{wildcards.cohort}/{wildcards.encoder}/{wildcards.model}")
    folds = fold_ids(wildcards.cohort)
    files = {"folds": "folds.csv", "predictions": "predictions.parquet", "logs": "log.json"}
    inputs = {key: [f"{stem}/fold{k}/{name}" for k in folds] for key, name in files.items()}
    run = [(wildcards.encoder, wildcards.model)]
    return inputs | {"checkpoints": checkpoints_of(wildcards.cohort, run)}


def evaluate_inputs(wildcards):
    return [out(f"results/{wildcards.cohort}/{run}/folds.csv") for run in run_names(wildcards.cohort)]


def report_inputs(wildcards):
    c = wildcards.cohort
    return {
        "summary": out(f"results/{c}/summary.csv"),
        "predictions": [out(f"results/{c}/{run}/predictions.parquet") for run in run_names(c)],
        "checkpoints": checkpoints_of(c, cohort_runs(c)),
        "manifest": out(f"omics/{c}/manifest.parquet"),
        "tiles": tiles_of(c),
        "stores": stores_of(c, primary_encoder(c)),
    }


def figure(name, caption, label):
    return report(
        out(f"results/{{cohort}}/figures/{name}"),
        caption=f"../report/{caption}",
        category="Results",
        subcategory="{cohort}",
        labels={"cohort": "{cohort}", "item": label},
    )


def optional_input(path):
    """A file the config may name (null: none) as a rule input, so that editing it reruns the rule."""
    return path if path not in (None, "") else []


def optional_flag(flag, value):
    """`--flag 'value'` when the config sets value, else nothing."""
    return f"{flag} {shlex.quote(str(value))}" if value not in (None, "", []) else ""
