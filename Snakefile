# HEALNet pipeline: whole-slide images + omic tables -> per-cohort survival models and a report.
#
# Each rule runs the `healnet` subcommand of its name. Every file it writes lies under config
# `outdir` (default output/); its log is {outdir}/logs/{rule}/... and its benchmark
# {outdir}/benchmarks/{rule}/... Data flow (one rule per arrow; paths under outdir):
#   demo     -> data/{cohort}/slides/*.svs, data/{cohort}/omics/*      (cohorts with demo: true)
#   tile     -> tiles/{cohort}/{geometry}/{slide}.parquet, qc/...    (geometry: 224px_0.5mpp, the encoder's)
#   encoder  -> features/{cohort}/{encoder}/encoder.pt                  (the encoder, built once)
#   extract  -> features/{cohort}/{encoder}/{slide}.zarr
#   omics    -> omics/{cohort}/manifest.parquet, features.parquet, splits.parquet, summary.json
#   train    -> models/{cohort}/{run}/fold{k}.pt, results/{cohort}/{run}/fold{k}/*  (one job per fold)
#   collect  -> results/{cohort}/{run}/folds.csv, predictions.parquet, log.json   (the folds joined)
#   evaluate -> results/{cohort}/summary.csv, summary.md, summary.html
#   report   -> results/{cohort}/figures/*.png, failed_slides.csv, logrank.csv
# A run is {encoder}/{model}: a model on one encoder's features (`none` for models that read no
# slides). config_snapshot writes results/{cohort}/{run}/config.json, the settings it trains with.
# `make run` then builds {outdir}/report.html with `snakemake --report`.

import sys

from snakemake.utils import min_version, validate

min_version("9.0")


# config.yaml configures the built-in demo. A run given its own file (--configfile) reads that file
# alone: Snakemake starts cluster jobs with --configfile but without --replace-workflow-config, and
# merging config.yaml under the user's file there would give jobs settings the plan did not have.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


# jsonschema without its optional IRI grammars, which cost seconds per Snakemake process; and
# "1e-4", which Snakemake's YAML reads as text, made a number where the schema wants one.
sys.path.insert(0, workflow.basedir)
from healnet.config import check_finite, import_jsonschema, in_schema_order, numbers_from_strings

import_jsonschema()
numbers_from_strings(config)
check_finite(config)
validate(config, "workflow/schemas/config.schema.yaml")
in_schema_order(config)  # params compare as text: the same values must give the same text


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


wildcard_constraints:
    cohort=r"[A-Za-z0-9_][A-Za-z0-9_\-]*",
    slide=r"[^/]+",
    model=r"[a-z_]+",
    fold=r"\d+",
    setting=r"\d+",
    encoder=r"[A-Za-z0-9_.\-]+",
    geometry=r"\d+px_\d+(\.\d+)?mpp",


include: "workflow/rules/demo.smk"
include: "workflow/rules/tile.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/omics.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        final_outputs(),
    default_target: True
