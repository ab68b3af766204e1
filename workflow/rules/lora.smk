rule train_lora:
    """Fine-tune a local Stable Diffusion with LoRA adapters on the training patches, one prompt per label (seed 004)."""
    input:
        indexes=expand("results/patches/{slide}.parquet", slide=training_slides()),
        patches=expand("results/patches/{slide}", slide=training_slides()),
    output:
        model=directory("results/lora/adapter"),
        losses="results/lora/loss.csv",
        samples=report(
            directory("results/lora/samples"),
            patterns=["step-{step}.png"],
            caption="../report/lora_samples.rst",
            category="4. Generative models",
            subcategory="LoRA previews",
            labels={"training step": "{step}"},
        ),
    log:
        "logs/train_lora.log",
    benchmark:
        "results/benchmarks/train_lora.tsv"
    conda:
        "../../envs/histosynth.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=24000,
        runtime=1440,
    params:
        stage="lora",
        config=lambda wc: training_config("lora"),
        checkpoints=lambda wc: checkpoint_folder("lora"),
    script:
        "../../scripts/train_model.py"


rule lora_synthesize:
    """Sample images per label from Stable Diffusion with the LoRA adapter at one LoRA scale: a synthetic set without masks."""
    input:
        model="results/lora/adapter",
        indexes=patch_indexes("train"),
        patches=expand("results/patches/{slide}", slide=split_slides("train")),
    output:
        report(
            directory("results/synthetic/lora{scale}"),
            patterns=["grid_{name}.png"],
            caption="../report/lora_grid.rst",
            category="5. Synthetic patches",
            labels={"set": "lora{scale}", "class": "{name}"},
        ),
    wildcard_constraints:
        scale=r"\d+",
    log:
        "logs/lora_synthesize/{scale}.log",
    benchmark:
        "results/benchmarks/lora_synthesize/{scale}.tsv"
    conda:
        "../../envs/histosynth.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=240,
    params:
        config=synthesis_config("lora", "labels", "seed"),
        size=config["patches"]["size"],
        scale=lambda wc: int(wc.scale) / 100,
    script:
        "../../scripts/lora_synthesize.py"
