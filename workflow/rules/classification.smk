rule train_classifier:
    """timm classifier (EfficientNet by default) on one ratio's training set and fold, early-stopped on the fold's validation slides."""
    input:
        manifest="results/mixing/{ratio}.parquet",
        indexes=patch_indexes("train") + patch_indexes("val"),
        patches=expand("results/patches/{slide}", slide=training_slides()),
    output:
        directory("results/classification/{ratio}/fold{fold}/seed{seed}"),
    log:
        "logs/train_classifier/{ratio}/fold{fold}/seed{seed}.log",
    benchmark:
        "results/benchmarks/train_classifier/{ratio}/fold{fold}/seed{seed}.tsv"
    conda:
        "../../envs/histosynth.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=720,
    params:
        config=task_config("classification"),
        seed=lambda wc: derive_seed(config["seed"], "classification", int(wc.seed)),
        fold=lambda wc: int(wc.fold),
    script:
        "../../scripts/train_classifier.py"


rule evaluate_classifier:
    """Accuracy, balanced accuracy, macro precision/recall/F1, per-class F1, AUROC and the confusion matrix on the test slides."""
    input:
        run="results/classification/{ratio}/fold{fold}/seed{seed}",
        indexes=patch_indexes("test"),
        patches=expand("results/patches/{slide}", slide=split_slides("test")),
    output:
        metrics="results/classification_evaluation/{ratio}/fold{fold}/seed{seed}.parquet",
        predictions="results/classification_evaluation/{ratio}/fold{fold}/seed{seed}.predictions.parquet",
    log:
        "logs/evaluate_classifier/{ratio}/fold{fold}/seed{seed}.log",
    benchmark:
        "results/benchmarks/evaluate_classifier/{ratio}/fold{fold}/seed{seed}.tsv"
    conda:
        "../../envs/histosynth.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    params:
        config=task_config("classification"),
    script:
        "../../scripts/evaluate_classifier.py"
