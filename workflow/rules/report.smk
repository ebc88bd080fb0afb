# One job per cohort: the figures a pathologist reads, also marked for `snakemake --report`.


rule report:
    input:
        unpack(report_inputs),
    output:
        km=figure("km_curves.png", "km_curves.rst", "Kaplan-Meier curves"),
        cindex=figure("c_index.png", "c_index.rst", "c-index per model"),
        wsi=figure("attention_wsi.png", "attention_wsi.rst", "HEALNet attention on slides"),
        omics=figure("attention_omics.png", "attention_omics.rst", "HEALNet attention on omic features"),
        logrank=out("results/{cohort}/logrank.csv"),
        failed=report(
            out("results/{cohort}/failed_slides.csv"),
            caption="../report/failed_slides.rst",
            category="Results",
            subcategory="{cohort}",
            labels={"cohort": "{cohort}", "item": "failed slides"},
        ),
    log:
        out("logs/report/{cohort}.log"),
    benchmark:
        out("benchmarks/report/{cohort}.tsv")
    params:
        healnet=HEALNET,
        results=out("results/{cohort}"),
        omics=out("omics/{cohort}"),
        models_dir=out("models/{cohort}"),
        encoder=lambda wc: primary_encoder(wc.cohort),
        features=lambda wc: out(f"features/{wc.cohort}/{primary_encoder(wc.cohort)}"),
        tiles=lambda wc: tiles_dir(wc.cohort),
        figures=out("results/{cohort}/figures"),
        r=config["report"],
        slides=lambda wc: optional_flag("--slides-dir", slides_dir(wc.cohort)),
        runs=lambda wc: ",".join(run_names(wc.cohort)),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    conda:
        "../../envs/model.yaml"
    shell:
        "{params.healnet} report --cohort {wildcards.cohort} --results-dir {params.results:q}"
        " --omics-dir {params.omics:q} --models-dir {params.models_dir:q}"
        " --encoder {params.encoder} --features-dir {params.features:q} --tiles-dir {params.tiles:q}"
        " {params.slides} --runs {params.runs} --top-omic-features {params.r[top_omic_features]}"
        " --heatmap-slides {params.r[heatmap_slides]} -o {params.figures:q} > {log:q} 2>&1"
