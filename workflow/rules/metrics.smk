rule mask_consistency:
    """Does each synthetic image agree with its mask (the baseline's segmenter) and its nuclei (the nuclei detector)? Per image, which curation reads, and pooled per class beside the real patches' own agreement, for the report."""
    input:
        unpack(consistency_inputs),
    output:
        table="results/quality/{set}.consistency.parquet",
        scores="results/quality/{set}.scores.parquet",
    log:
        "logs/mask_consistency/{set}.log",
    benchmark:
        "results/benchmarks/mask_consistency/{set}.tsv"
    conda:
        "../../envs/histosynth.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    params:
        config=rule_params.consistency_params(config, LABELS, nuclei_model_path()),
    script:
        "../../scripts/mask_consistency.py"


rule image_quality:
    """Offline FD/KD, FID/KID/IS and diversity of one synthetic set against the real training patches, for the report."""
    input:
        unpack(quality_inputs),
    output:
        table="results/quality/{set}.parquet",
    log:
        "logs/image_quality/{set}.log",
    benchmark:
        "results/benchmarks/image_quality/{set}.tsv"
    conda:
        "../../envs/histosynth.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=240,
    params:
        config=rule_params.quality_params(config, LABELS),
    script:
        "../../scripts/image_quality.py"


rule realism:
    """Can a classifier tell one synthetic set from the real training patches (C2ST AUC per class, out of fold), and are its images as sharp (Laplacian variance, power spectrum)? Needs no downloaded weights."""
    input:
        indexes=patch_indexes("train"),
        synthetic="results/synthetic/{set}",
    output:
        table="results/quality/{set}.realism.parquet",
        images="results/quality/{set}.realism_images.parquet",
        figure=report("results/quality/{set}.realism.png", caption="../report/realism.rst", category="5. Synthetic patches",
                      subcategory="Realism", labels={"set": "{set}", "figure": "realism"}),
    log:
        "logs/realism/{set}.log",
    benchmark:
        "results/benchmarks/realism/{set}.tsv"
    conda:
        "../../envs/histosynth.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    params:
        config=config_params("realism", "labels"),
    script:
        "../../scripts/realism.py"


localrules:
    fetch_weights,


rule fetch_weights:
    """Download Inception (FID/KID/IS), AlexNet (LPIPS) and the ImageNet encoder into weights_dir. Needs network."""
    log:
        "logs/fetch_weights.log",
    conda:
        "../../envs/histosynth.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=2000,
        runtime=30,
    params:
        config=config_params("segmentation", "classification", "weights_dir"),
    script:
        "../../scripts/fetch_weights.py"
