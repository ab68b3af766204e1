"""Rules synthesize and inpaint: a synthetic set, its manifest and grids (histosynth.generators.synthesis.run_stage);
params.mode says which."""

from histosynth.generators.synthesis import run_stage
from histosynth.logs import log_to

log_to(snakemake.log[0])
config = snakemake.params.config
run_stage(
    snakemake.params.mode,
    snakemake.input.model,
    snakemake.input.indexes,
    snakemake.output[0],
    settings=config["synthesis"],
    classes=config["classes"],
    labels=config["labels"],
    conditioning_cfg=config["conditioning"],
    seed=config["seed"],
    autoencoder=snakemake.input.get("autoencoder"),
)
