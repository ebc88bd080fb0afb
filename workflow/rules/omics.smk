# One job per cohort: clinical + omic tables joined per patient, slides matched by barcode, folds.


rule omics:
    input:
        unpack(omics_inputs),
    output:
        manifest="omics/{cohort}/manifest.parquet",
        features="omics/{cohort}/features.parquet",
        splits="omics/{cohort}/splits.parquet",
        summary="omics/{cohort}/summary.json",
    log:
        "logs/{cohort}/omics.log",
    benchmark:
        "benchmarks/out/{cohort}/omics.tsv"
    params:
        healnet=HEALNET,
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
        " --n-bins {params.o[n_bins]} --seed {params.o[seed]} -o omics/{wildcards.cohort} > {log} 2>&1"
