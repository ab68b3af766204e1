"""Rule lora_synthesize: one LoRA scale's synthetic set, its manifest and grids (histosynth.generators.label_sets.lora_stage)."""

from histosynth.generators.label_sets import lora_stage
from histosynth.logs import log_to

log_to(snakemake.log[0])
config = snakemake.params.config
lora_stage(
    snakemake.input.model,
    snakemake.input.indexes,
    snakemake.output[0],
    settings=config["synthesis"],
    labels=config["labels"],
    size=snakemake.params.size,
    seed=config["seed"],
    scale=snakemake.params.scale,
)
