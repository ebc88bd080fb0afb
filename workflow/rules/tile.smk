# One job per slide and patch geometry: MPP-aware patch grid on the tissue mask, plus a QC picture to
# look at. The geometry ({patch size}px_{um per px}mpp) is that of the encoders reading the tiles
# (common.smk: geometry_of), so encoders that cut the same patches share one tiling.


rule tile:
    input:
        slide=slide_path,
        # an input, not only a flag: a corrected table must re-tile (and so re-extract and retrain)
        mpp_overrides=optional_input(config["tiling"]["mpp_overrides"]),
    output:
        tiles=out("tiles/{cohort}/{geometry}/{slide}.parquet"),
        qc=report(
            out("qc/{cohort}/{geometry}/{slide}.png"),
            caption="../report/tiling_qc.rst",
            category="Tiling QC",
            subcategory="{cohort}",
            labels={"cohort": "{cohort}", "geometry": "{geometry}", "slide": "{slide}"},
        ),
    log:
        out("logs/tile/{cohort}/{geometry}/{slide}.log"),
    benchmark:
        out("benchmarks/tile/{cohort}/{geometry}/{slide}.tsv")
    params:
        healnet=HEALNET,
        # the patch size and resolution are in the path; the geometry's own settings are not params, so
        # that writing out the encoder's values (tiling.patch_size: 224 for UNI) re-tiles nothing
        t={k: v for k, v in config["tiling"].items() if k not in ("on_slide_error", "patch_size", "target_mpp")},
        geometry=lambda wc: dict(zip(("patch_size", "target_mpp"), parse_geometry(wc.geometry))),
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
        " --target-mpp {params.geometry[target_mpp]} --patch-size {params.geometry[patch_size]}"
        " --min-tissue-fraction {params.t[min_tissue_fraction]} {params.options}"
        " --on-error {resources.on_slide_error} > {log:q} 2>&1"
