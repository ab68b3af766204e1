rule train_segmentation:
    """U-Net (smp, scSE decoder attention) on one ratio's training set, early-stopped on the val slides."""
    input:
        manifest="results/mixing/{ratio}.parquet",
        indexes=patch_indexes("val"),
        patches=expand("results/patches/{slide}", slide=split_slides("val")),
    output:
        directory("results/segmentation/{ratio}/seed{seed}"),
    log:
        "logs/train_segmentation/{ratio}/seed{seed}.log",
    benchmark:
        "results/benchmarks/train_segmentation/{ratio}/seed{seed}.tsv"
    conda:
        "../../envs/histosynth.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=720,
    params:
        config=task_config("segmentation"),
        seed=lambda wc: derive_seed(config["seed"], "segmentation", int(wc.seed)),
    script:
        "../../scripts/train_segmentation.py"


rule evaluate_segmentation:
    """Dice, precision and recall per class on the test slides (per slide and pooled, from the per-image TP/FP/FN table), TP/FP/FN overlays."""
    input:
        run="results/segmentation/{ratio}/seed{seed}",
        indexes=patch_indexes("test"),
        patches=expand("results/patches/{slide}", slide=split_slides("test")),
    output:
        metrics="results/evaluation/{ratio}/seed{seed}.parquet",
        images="results/evaluation/{ratio}/seed{seed}.images.parquet",
        overlays=report(
            directory("results/evaluation/{ratio}/seed{seed}_overlays"),
            patterns=["{name}.png"],
            caption="../report/overlays.rst",
            category="7. Segmentation",
            subcategory="Test overlays",
            labels={"ratio": "{ratio}", "seed": "{seed}", "patch": "{name}"},
        ),
    log:
        "logs/evaluate_segmentation/{ratio}/seed{seed}.log",
    benchmark:
        "results/benchmarks/evaluate_segmentation/{ratio}/seed{seed}.tsv"
    conda:
        "../../envs/histosynth.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    params:
        config=task_config("segmentation"),
    script:
        "../../scripts/evaluate_segmentation.py"
