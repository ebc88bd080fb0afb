# Training and scoring: one job per cohort x encoder x model x fold (`train`), the folds of a run joined
# (`collect`), and the runs compared (`evaluate`). A run's files lie in {cohort}/{encoder}/{model}/: the
# encoder whose features the model reads, `none` for a model that reads no slides (common.smk).


# The settings each model is trained with, as its training jobs read them (see training_settings).
rule config_snapshot:
    output:
        out("results/{cohort}/{encoder}/{model}/config.json"),
    log:
        out("logs/config_snapshot/{cohort}/{encoder}/{model}.log"),
    benchmark:
        out("benchmarks/config_snapshot/{cohort}/{encoder}/{model}.tsv")
    params:
        text=training_settings,
    threads: 1
    resources:
        mem_mb=200,
        runtime=1,
    conda:
        "../../envs/tables.yaml"
    shell:
        "printf '%s\\n' {params.text:q} > {output:q} 2> {log:q}"


onstart:
    search_cost()


# Nested model selection (training.search): one job per fold and candidate setting, scored on inner
# folds of that fold's training patients only, so a cluster runs a fold's candidates side by side; the
# fold's train job reads their scores, chooses and trains the choice on the whole training fold.
rule search:
    input:
        unpack(run_inputs),
    output:
        out("results/{cohort}/{encoder}/{model}/search/fold{fold}/setting{setting}.json"),
    log:
        out("logs/search/{cohort}/{encoder}/{model}/fold{fold}-setting{setting}.log"),
    benchmark:
        out("benchmarks/search/{cohort}/{encoder}/{model}/fold{fold}-setting{setting}.tsv")
    params:
        healnet=HEALNET,
        omics=out("omics/{cohort}"),
        features=out("features/{cohort}/{encoder}"),
        models=out("models/{cohort}/{encoder}/{model}"),
        device=config["training"]["device"],
    threads: config["training"]["threads"]
    resources:
        **TRAINING_RESOURCES,
    conda:
        "../../envs/model.yaml"
    shell:
        "{params.healnet} search --config {input.config:q} --cohort {wildcards.cohort} --model {wildcards.model}"
        " --fold {wildcards.fold} --setting {wildcards.setting} --omics-dir {params.omics:q}"
        " --features-dir {params.features:q} --models-dir {params.models:q} -o {output:q}"
        + TRAINING_RUN_OPTIONS


# One job per cohort x encoder x model x fold, so that a failed or cancelled job loses one fold and a cluster
# trains the folds side by side; every fold is seeded on its own, so the numbers are those of one
# all-fold run.
rule train:
    input:
        unpack(train_inputs),
    output:
        folds=out("results/{cohort}/{encoder}/{model}/fold{fold}/folds.csv"),
        predictions=out("results/{cohort}/{encoder}/{model}/fold{fold}/predictions.parquet"),
        log_json=out("results/{cohort}/{encoder}/{model}/fold{fold}/log.json"),
        checkpoint=out("models/{cohort}/{encoder}/{model}/fold{fold}.pt"),
    log:
        out("logs/train/{cohort}/{encoder}/{model}/fold{fold}.log"),
    benchmark:
        out("benchmarks/train/{cohort}/{encoder}/{model}/fold{fold}.tsv")
    params:
        healnet=HEALNET,
        omics=out("omics/{cohort}"),
        features=out("features/{cohort}/{encoder}"),
        models=out("models/{cohort}/{encoder}/{model}"),
        results=out("results/{cohort}/{encoder}/{model}/fold{fold}"),
        search=search_dir,
        device=config["training"]["device"],
    threads: config["training"]["threads"]
    resources:
        **TRAINING_RESOURCES,
    conda:
        "../../envs/model.yaml"
    shell:
        "{params.healnet} train --config {input.config:q} --cohort {wildcards.cohort} --model {wildcards.model}"
        " --folds {wildcards.fold} --omics-dir {params.omics:q} --features-dir {params.features:q}"
        " --models-dir {params.models:q} --results-dir {params.results:q} --search-dir {params.search:q}"
        + TRAINING_RUN_OPTIONS


# The folds of one run joined into the files an all-fold `healnet train` writes.
rule collect:
    input:
        unpack(fold_outputs),
    output:
        folds=out("results/{cohort}/{encoder}/{model}/folds.csv"),
        predictions=out("results/{cohort}/{encoder}/{model}/predictions.parquet"),
        log_json=out("results/{cohort}/{encoder}/{model}/log.json"),
    log:
        out("logs/collect/{cohort}/{encoder}/{model}.log"),
    benchmark:
        out("benchmarks/collect/{cohort}/{encoder}/{model}.tsv")
    params:
        healnet=HEALNET,
        results=out("results/{cohort}/{encoder}/{model}"),
        folds=lambda wc: ",".join(map(str, fold_ids(wc.cohort))),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/model.yaml"
    shell:
        "{params.healnet} collect --results-dir {params.results:q} --folds {params.folds} > {log:q} 2>&1"


rule evaluate:
    input:
        evaluate_inputs,
    output:
        csv=report(
            out("results/{cohort}/summary.csv"),
            caption="../report/summary.rst",
            category="Results",
            subcategory="{cohort}",
            labels={"cohort": "{cohort}", "item": "summary (CSV)"},
        ),
        md=out("results/{cohort}/summary.md"),
        # The same table as HTML: the report shows it in the page (a CSV is only a download).
        html=report(
            out("results/{cohort}/summary.html"),
            caption="../report/summary_html.rst",
            category="Results",
            subcategory="{cohort}",
            labels={"cohort": "{cohort}", "item": "summary table"},
        ),
    log:
        out("logs/evaluate/{cohort}.log"),
    benchmark:
        out("benchmarks/evaluate/{cohort}.tsv")
    params:
        healnet=HEALNET,
        results=out("results/{cohort}"),
        runs=lambda wc: ",".join(run_names(wc.cohort)),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/model.yaml"
    shell:
        "{params.healnet} evaluate --cohort {wildcards.cohort} --results-dir {params.results:q}"
        " --runs {params.runs} -o {output.csv:q} > {log:q} 2>&1"
