rule train_diffusion:
    """Train the mask-conditioned diffusion U-Net on the training split's patches and conditioning maps."""
    input:
        unpack(diffusion_inputs),
    output:
        model=directory("results/diffusion/model"),
        losses="results/diffusion/loss.csv",
        samples=report(
            directory("results/diffusion/samples"),
            patterns=["step-{step}.png"],
            caption="../report/diffusion_samples.rst",
            category="4. Generative models",
            subcategory="Diffusion previews",
            labels={"training step": "{step}"},
        ),
    log:
        "logs/train_diffusion.log",
    benchmark:
        "results/benchmarks/train_diffusion.tsv"
    conda:
        "../../envs/histosynth.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=1440,
    params:
        stage="diffusion",
        config=lambda wc: training_config("diffusion"),
        checkpoints=lambda wc: checkpoint_folder("diffusion"),
    script:
        "../../scripts/train_model.py"
