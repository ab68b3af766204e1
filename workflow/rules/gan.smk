rule train_gan:
    """Train the class-conditional GAN of seeds 000/001 (hinge loss, spectral norm, TTUR) on the training slides' patches and their labels."""
    input:
        unpack(gan_training_inputs),
    output:
        model=directory("results/gan/model"),
        losses="results/gan/loss.csv",
        samples=report(
            directory("results/gan/samples"),
            patterns=["step-{step}.png"],
            caption="../report/gan_samples.rst",
            category="4. Generative models",
            subcategory="GAN previews",
            labels={"training step": "{step}"},
        ),
    log:
        "logs/train_gan.log",
    benchmark:
        "results/benchmarks/train_gan.tsv"
    conda:
        "../../envs/histosynth.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=1440,
    params:
        stage="gan",
        config=lambda wc: training_config("gan"),
        checkpoints=lambda wc: checkpoint_folder("gan"),
    script:
        "../../scripts/train_model.py"


rule gan_synthesize:
    """Draw images per label from the trained GAN: a synthetic set without masks (classification, quality, curation)."""
    input:
        model="results/gan/model",
        indexes=patch_indexes("train"),
        patches=expand("results/patches/{slide}", slide=split_slides("train")),
    output:
        report(
            directory("results/synthetic/gan"),
            patterns=["grid_{name}.png"],
            caption="../report/gan_grid.rst",
            category="5. Synthetic patches",
            labels={"set": "gan", "class": "{name}"},
        ),
    log:
        "logs/gan_synthesize.log",
    benchmark:
        "results/benchmarks/gan_synthesize.tsv"
    conda:
        "../../envs/histosynth.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    params:
        config=synthesis_config("gan", "labels", "seed"),
        size=config["patches"]["size"],
    script:
        "../../scripts/gan_synthesize.py"
