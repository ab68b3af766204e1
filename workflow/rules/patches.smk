rule extract_patches:
    """Cut one slide into patches at the target mpp, with label masks, an index table and a QC thumbnail."""
    input:
        image=slide_image,
        annotations=slide_annotations,
    output:
        patches=directory("results/patches/{slide}"),
        index="results/patches/{slide}.parquet",
        qc=report(
            "results/patches/{slide}.qc.png",
            caption="../report/patches_qc.rst",
            category="3. Patches",
            labels={"slide": "{slide}", "figure": "QC thumbnail"},
        ),
    log:
        "logs/extract_patches/{slide}.log",
    benchmark:
        "results/benchmarks/extract_patches/{slide}.tsv"
    conda:
        "../../envs/histosynth.yaml"
    threads: 4
    resources:
        gpu=0,
        mem_mb=4000,
        runtime=60,
    params:
        split=lambda wc: slide_row(wc)["split"],
        mpp=slide_mpp,
        label=lambda wc: slide_row(wc)["label"] or None,
        config=config_params("patches", "classes", "priority", "annotations"),
    script:
        "../../scripts/extract_patches.py"
