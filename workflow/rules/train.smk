# One job per cohort x model: every fold trained and scored (full and missing-modality settings).


# The settings each model is trained with, as its training jobs read them (see training_settings).
rule config_snapshot:
    output:
        "results/{cohort}/{model}/config.json",
    log:
        "logs/{cohort}/config_snapshot/{model}.log",
    params:
        text=training_settings,
    threads: 1
    resources:
        mem_mb=200,
        runtime=1,
    conda:
        "../../envs/tables.yaml"
    shell:
        "printf '%s\\n' {params.text:q} > {output} 2> {log}"


# One job per cohort x model x fold, so that a failed or cancelled job loses one fold and a cluster
# trains the folds side by side; every fold is seeded on its own, so the numbers are those of one
# all-fold run.
rule train_fold:
    input:
        unpack(train_inputs),
    output:
        folds="results/{cohort}/{model}/fold{fold}/folds.csv",
        predictions="results/{cohort}/{model}/fold{fold}/predictions.parquet",
        log_json="results/{cohort}/{model}/fold{fold}/log.json",
        checkpoint="models/{cohort}/{model}/fold{fold}.pt",
    log:
        "logs/{cohort}/train/{model}/fold{fold}.log",
    benchmark:
        "benchmarks/out/{cohort}/train/{model}/fold{fold}.tsv"
    params:
        healnet=HEALNET,
        encoder=ENCODER,
        device=config["training"]["device"],
    threads: config["training"]["threads"]
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=device_needs_gpu("training"),
        readers=config["training"]["workers"],  # run settings (see common.smk)
        save_state_minutes=config["training"]["save_state_minutes"],
        feature_cache=config["training"]["feature_cache"] or "none",
        bags_on_device=BAGS_ON_DEVICE_SETTING_WORDS[config["training"]["bags_on_device"]],
    conda:
        "../../envs/model.yaml"
    shell:
        "{params.healnet} train --config {input.config} --cohort {wildcards.cohort} --model {wildcards.model}"
        " --folds {wildcards.fold}"
        " --omics-dir omics/{wildcards.cohort} --features-dir features/{wildcards.cohort}/{params.encoder}"
        " --models-dir models/{wildcards.cohort}/{wildcards.model}"
        " --results-dir results/{wildcards.cohort}/{wildcards.model}/fold{wildcards.fold}"
        " --threads {threads} --workers {resources.readers} --save-state-minutes {resources.save_state_minutes}"
        " --feature-cache {resources.feature_cache:q} --bags-on-device {resources.bags_on_device}"
        " --device {params.device} > {log} 2>&1"


# The folds of one model joined into the files an all-fold `healnet train` writes.
rule train:
    input:
        unpack(fold_outputs),
    output:
        folds="results/{cohort}/{model}/folds.csv",
        predictions="results/{cohort}/{model}/predictions.parquet",
        log_json="results/{cohort}/{model}/log.json",
    log:
        "logs/{cohort}/train/{model}.log",
    params:
        healnet=HEALNET,
        folds=lambda wc: ",".join(map(str, fold_ids(wc.cohort))),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/model.yaml"
    shell:
        "{params.healnet} collect --results-dir results/{wildcards.cohort}/{wildcards.model}"
        " --folds {params.folds} > {log} 2>&1"


rule evaluate:
    input:
        evaluate_inputs,
    output:
        csv=report(
            "results/{cohort}/summary.csv",
            caption="../report/summary.rst",
            category="Results",
            subcategory="{cohort}",
            labels={"cohort": "{cohort}", "item": "summary (CSV)"},
        ),
        md="results/{cohort}/summary.md",
        # The same table as HTML: the report shows it in the page (a CSV is only a download).
        html=report(
            "results/{cohort}/summary.html",
            caption="../report/summary_html.rst",
            category="Results",
            subcategory="{cohort}",
            labels={"cohort": "{cohort}", "item": "summary table"},
        ),
    log:
        "logs/{cohort}/evaluate.log",
    benchmark:
        "benchmarks/out/{cohort}/evaluate.tsv"
    params:
        healnet=HEALNET,
        models=lambda wc: ",".join(cohort_models(wc.cohort)),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/model.yaml"
    shell:
        "{params.healnet} evaluate --cohort {wildcards.cohort} --results-dir results/{wildcards.cohort}"
        " --models {params.models} -o {output.csv} > {log} 2>&1"
