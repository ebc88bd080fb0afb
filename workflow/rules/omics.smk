# One job per cohort: clinical + omic tables joined per patient, slides matched by barcode, folds.


rule omics:
    input:
        unpack(omics_inputs),
    output:
        manifest=out("omics/{cohort}/manifest.parquet"),
        features=out("omics/{cohort}/features.parquet"),
        splits=out("omics/{cohort}/splits.parquet"),
        summary=out("omics/{cohort}/summary.json"),
    log:
        out("logs/omics/{cohort}.log"),
    benchmark:
        out("benchmarks/omics/{cohort}.tsv")
    params:
        healnet=HEALNET,
        folder=out("omics/{cohort}"),
        o=config["omics"],
        args=omics_args,
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    conda:
        "../../envs/tables.yaml"
    shell:
        "{params.healnet} omics --cohort {wildcards.cohort} {params.args} --n-folds {params.o[n_folds]}"
        " --n-bins {params.o[n_bins]} --seed {params.o[seed]} -o {params.folder:q} > {log:q} 2>&1"
