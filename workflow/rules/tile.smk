# One job per slide: MPP-aware patch grid on the tissue mask, plus a QC picture to look at.


rule tile:
    input:
        slide=slide_path,
        # an input, not only a flag: a corrected table must re-tile (and so re-extract and retrain)
        mpp_overrides=optional_input(config["tiling"]["mpp_overrides"]),
    output:
        tiles=out("tiles/{cohort}/{slide}.parquet"),
        qc=report(
            out("qc/{cohort}/{slide}.png"),
            caption="../report/tiling_qc.rst",
            category="Tiling QC",
            subcategory="{cohort}",
            labels={"cohort": "{cohort}", "slide": "{slide}"},
        ),
    log:
        out("logs/tile/{cohort}/{slide}.log"),
    benchmark:
        out("benchmarks/tile/{cohort}/{slide}.tsv")
    params:
        healnet=HEALNET,
        t={k: v for k, v in config["tiling"].items() if k != "on_slide_error"},
        options=" ".join(
            [
                optional_flag("--mpp-overrides", config["tiling"]["mpp_overrides"]),
                optional_flag("--default-mpp", config["tiling"]["default_mpp"]),
            ]
        ),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        # what becomes of a slide that fails, not what a good slide gives: a resource, not a param, so
        # that switching it re-tiles nothing (a slide recorded as failed is retried once its tiles
        # file is deleted)
        on_slide_error=config["tiling"]["on_slide_error"],
    conda:
        "../../envs/slides.yaml"
    shell:
        "{params.healnet} tile {input.slide:q} -o {output.tiles:q} --qc {output.qc:q}"
        " --target-mpp {params.t[target_mpp]} --patch-size {params.t[patch_size]}"
        " --min-tissue-fraction {params.t[min_tissue_fraction]} {params.options}"
        " --on-error {resources.on_slide_error} > {log:q} 2>&1"
