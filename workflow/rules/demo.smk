# A synthetic TCGA-like cohort: slides (real pyramidal SVS) and omic tables with a planted signal.

if DEMO_COHORTS:

    rule demo:
        output:
            slides=expand("data/{{cohort}}/slides/{name}", name=demo_slide_names()),
            tables=expand("data/{{cohort}}/omics/{table}", table=DEMO_TABLES),
            truth="data/{cohort}/ground_truth.csv",
            plan="data/{cohort}/cohort.json",
        log:
            "logs/{cohort}/demo.log",
        benchmark:
            "benchmarks/out/{cohort}/demo.tsv"
        params:
            healnet=HEALNET,
            d=config["demo"],
        wildcard_constraints:
            cohort="|".join(DEMO_COHORTS),
        threads: 2
        resources:
            mem_mb=4000,
            runtime=30,
        conda:
            "../../envs/slides.yaml"
        shell:
            "{params.healnet} demo --out data/{wildcards.cohort} --patients {params.d[patients]}"
            " --seed {params.d[seed]} --long-side-px {params.d[long_side_px]}"
            " --corrupt-slides {params.d[corrupt_slides]} --workers {threads} > {log} 2>&1"
