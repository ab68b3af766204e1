rule train_autoencoder:
    """Train the VQ-VAE (or KL autoencoder) on the training split; report reconstruction PSNR/SSIM on validation."""
    input:
        indexes=expand("results/patches/{slide}.parquet", slide=training_slides()),
        patches=expand("results/patches/{slide}", slide=training_slides()),
    output:
        model=directory("results/autoencoder/model"),
        losses="results/autoencoder/loss.csv",
        metrics="results/autoencoder/metrics.json",
        grid=report(
            "results/autoencoder/reconstructions.png",
            caption="../report/autoencoder.rst",
            category="4. Generative models",
            subcategory="Autoencoder",
            labels={"figure": "real vs reconstruction"},
        ),
    log:
        "logs/train_autoencoder.log",
    benchmark:
        "results/benchmarks/train_autoencoder.tsv"
    conda:
        "../../envs/histosynth.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=240,
    params:
        stage="autoencoder",
        config=lambda wc: training_config("autoencoder"),
        checkpoints=lambda wc: checkpoint_folder("autoencoder"),
    script:
        "../../scripts/train_model.py"
