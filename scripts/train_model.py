"""Rules train_autoencoder, train_diffusion, train_gan and train_lora: one process on one device, accelerate launch on
several GPUs (histosynth.generators.launch.launch); params.stage names the model trained."""

from pathlib import Path

from histosynth.generators.launch import launch

launch(
    snakemake.params.stage,
    snakemake.params.config,
    snakemake.input.indexes,
    Path(snakemake.output.model).parent,
    checkpoints=snakemake.params.checkpoints,
    log=snakemake.log[0],
    gpus=snakemake.resources.gpu,
    threads=snakemake.threads,
    autoencoder=snakemake.input.get("autoencoder"),
)
