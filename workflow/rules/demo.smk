# A synthetic TCGA-like cohort: slides (real pyramidal SVS) and omic tables with a planted signal.

if DEMO_COHORTS:

    rule demo:
        output:
            slides=expand(out("data/{{cohort}}/slides/{name}"), name=demo_slide_names()),
            tables=expand(out("data/{{cohort}}/omics/{table}"), table=DEMO_TABLES),
            truth=out("data/{cohort}/ground_truth.csv"),
            plan=out("data/{cohort}/cohort.json"),
        log:
            out("logs/demo/{cohort}.log"),
        benchmark:
            out("benchmarks/demo/{cohort}.tsv")
        params:
            healnet=HEALNET,
            folder=out("data/{cohort}"),
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
            "{params.healnet} demo --out {params.folder:q} --patients {params.d[patients]}"
            " --seed {params.d[seed]} --long-side-px {params.d[long_side_px]}"
            " --corrupt-slides {params.d[corrupt_slides]} --workers {threads} > {log:q} 2>&1"
