# One job per slide: patch embeddings into a Zarr store. Declares a GPU so clusters place it on one.


# The encoder built once (weights loaded, traced, frozen): each extraction job, CPU or GPU, then loads
# it in a fraction of a second instead of seconds importing timm and tracing. Kept, not temporary:
# Snakemake reruns every job whose input another job rewrites (ancient() does not stop that), so a
# remade encoder file would send every finished store of the cohort back to extraction whenever one
# slide needed extracting (a slide added, a lost store). Stores follow the encoder itself: its name
# is in their path, and its weights file is the encoder's input (so new weights remake it, and then
# every store) and in the params of both rules.
rule encoder:
    input:
        weights=lambda wc: optional_input(ENCODER_WEIGHTS.get(wc.encoder)),
    output:
        out("features/{cohort}/{encoder}/encoder.pt"),
    log:
        out("logs/encoder/{cohort}/{encoder}.log"),
    benchmark:
        out("benchmarks/encoder/{cohort}/{encoder}.tsv")
    params:
        healnet=HEALNET,
        weights=lambda wc: optional_flag("--weights", ENCODER_WEIGHTS.get(wc.encoder)),
    threads: 1
    resources:
        mem_mb=lambda wc: encoder_mem_mb(wc, 4000),
        runtime=10,
    conda:
        "../../envs/slides.yaml"
    shell:
        "{params.healnet} encoder --encoder {wildcards.encoder} {params.weights} -o {output:q} > {log:q} 2>&1"


rule extract:
    wildcard_constraints:
        cohort=name_pattern(EXTRACTED_COHORTS),
    input:
        slide=slide_path,
        tiles=lambda wc: out(f"tiles/{wc.cohort}/{geometry_of(wc.encoder)}/{wc.slide}.parquet"),
        encoder=out("features/{cohort}/{encoder}/encoder.pt"),
        stain_reference=optional_input(config["extract"]["stain_reference"]),
    output:
        store=directory(out("features/{cohort}/{encoder}/{slide}.zarr")),
    log:
        out("logs/extract/{cohort}/{encoder}/{slide}.log"),
    benchmark:
        out("benchmarks/extract/{cohort}/{encoder}/{slide}.tsv")
    params:
        healnet=HEALNET,
        device=config["extract"]["device"],
        dtype=config["extract"]["dtype"],
        max_bad=config["extract"]["max_bad_patch_fraction"],
        # a param: the readers' pixels differ slightly (DCT-scaled decoding), so switching re-extracts
        reader=config["extract"]["reader"],
        options=lambda wc: " ".join(
            [
                optional_flag("--weights", ENCODER_WEIGHTS.get(wc.encoder)),
                optional_flag("--stain-norm", config["extract"]["stain_norm"]),
                optional_flag("--stain-reference", config["extract"]["stain_reference"]),
            ]
        ),
    threads: config["extract"]["threads"]
    resources:
        mem_mb=lambda wc: encoder_mem_mb(wc, 8000),
        runtime=120,
        gpu=device_needs_gpu("extract"),
        # run settings (see common.smk): resources, not params, so that changing them re-extracts nothing
        readers=config["extract"]["workers"],
        patches_per_batch=config["extract"]["batch_size"],
        on_slide_error=config["tiling"]["on_slide_error"],  # as for tiling: switching it reruns nothing
    conda:
        "../../envs/slides.yaml"
    shell:
        "{params.healnet} extract {input.slide:q} {input.tiles:q} -o {output.store:q}"
        " --encoder {wildcards.encoder} --encoder-file {input.encoder:q} {params.options}"
        " --device {params.device} --dtype {params.dtype} --max-bad-patch-fraction {params.max_bad}"
        " --batch-size {resources.patches_per_batch} --workers {resources.readers}"
        " --threads {threads} --on-slide-error {resources.on_slide_error} --reader {params.reader}"
        " > {log:q} 2>&1"


# One job per slide of a cohort with `features: {format, path, encoder}`: a CLAM or TRIDENT .h5 file
# turned into the store extraction would have written, so training, evaluation and the report run on
# it unchanged. Such a cohort has no tiling or extraction; its stores' rows decide its usable slides.
rule import_features:
    wildcard_constraints:
        cohort=name_pattern(IMPORTED_COHORTS),
    input:
        h5=slide_path,
    output:
        store=directory(out("features/{cohort}/{encoder}/{slide}.zarr")),
    log:
        out("logs/import_features/{cohort}/{encoder}/{slide}.log"),
    benchmark:
        out("benchmarks/import_features/{cohort}/{encoder}/{slide}.tsv")
    params:
        healnet=HEALNET,
        folder=out("features/{cohort}/{encoder}"),
        format=lambda wc: imported(wc.cohort)["format"],
        slides=lambda wc: optional_flag("--slides", slides_dir(wc.cohort)),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/slides.yaml"
    shell:
        "{params.healnet} import-features --format {params.format} {input.h5:q} -o {params.folder:q}"
        " --encoder {wildcards.encoder} {params.slides} > {log:q} 2>&1"
