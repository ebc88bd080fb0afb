# One job per slide: patch embeddings into a Zarr store. Declares a GPU so clusters place it on one.


rule extract:
    input:
        slide=slide_path,
        tiles="tiles/{cohort}/{slide}.parquet",
    output:
        store=directory("features/{cohort}/{encoder}/{slide}.zarr"),
    log:
        "logs/{cohort}/extract/{encoder}/{slide}.log",
    benchmark:
        "benchmarks/out/{cohort}/extract/{encoder}/{slide}.tsv"
    params:
        healnet=HEALNET,
        e=config["extract"],
        options=" ".join(
            [
                optional_flag("--weights", config["extract"]["weights"]),
                optional_flag("--stain-norm", config["extract"]["stain_norm"]),
                optional_flag("--stain-reference", config["extract"]["stain_reference"]),
            ]
        ),
    threads: config["extract"]["threads"]
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=device_needs_gpu("extract"),
    conda:
        "../../envs/slides.yaml"
    shell:
        "{params.healnet} extract {input.slide:q} {input.tiles:q} -o {output.store:q}"
        " --encoder {wildcards.encoder} {params.options} --batch-size {params.e[batch_size]}"
        " --device {params.e[device]} --dtype {params.e[dtype]} --workers {params.e[workers]}"
        " --threads {threads} --max-bad-patch-fraction {params.e[max_bad_patch_fraction]} > {log:q} 2>&1"
